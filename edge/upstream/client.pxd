# Types for the compiled build of client.py (Cython's augmenting .pxd: the .py stays the source
# and the pure-Python fallback; this file only tells the compiler what the hot locals are).
import cython

@cython.locals(lines=list, n=Py_ssize_t, first=str, minor=Py_UCS4, d1=Py_UCS4, d2=Py_UCS4, d3=Py_UCS4, status=int)
cpdef _parse_head_fast(str text)

@cython.locals(connection=str, te=str, lengths=list, i=Py_ssize_t, name=str)
cpdef tuple _framing_fields(list pairs, list names)

@cython.locals(pieces=list)
cpdef bytes serialize_request(method, target, headers, body, close)
