# Types for the compiled build of fields.py (Cython's augmenting .pxd: the .py stays the source
# and the pure-Python fallback; this file only tells the compiler what the hot locals are).
import cython

@cython.locals(
    kept=list, lines=list, date=bint, server=bint, i=Py_ssize_t, name=str, pair=tuple, tokens=frozenset,
    noted=dict, note=long, data=bytes,
)
cpdef _member_fields(list pairs, list names, frozenset hidden)
