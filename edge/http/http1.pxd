# Types for the compiled build of http1.py (Cython's augmenting .pxd: the .py stays the source
# and the pure-Python fallback, this file only tells the compiler what the hot locals are).
import cython

@cython.locals(
    pairs=list, names=list, i=Py_ssize_t, line=str, colon=Py_ssize_t, name=str, lower=str,
    start=Py_ssize_t, end=Py_ssize_t,
)
cpdef split_fields(list lines, dict known)

@cython.locals(
    lines=list, n=Py_ssize_t, parts=list, method=str, target=str, version=str, fields=tuple,
    bits=dict, seen=long, bit=long, lower=str,
)
cpdef _parse_head_fast(str text, Py_ssize_t max_headers, bint proxy)

@cython.locals(text=str, fast=tuple)
cpdef parse_head(block, Py_ssize_t max_headers, Py_ssize_t max_field, bint proxy=*)

@cython.locals(
    hosts=Py_ssize_t, te_in=bint, cl_in=bint, connection_in=bint, expect_in=bint, chunked=bint,
    keep_alive=bint, expect=bint, connection=str,
)
cpdef _head(
    str method, str target, str version, headers, absolute_host, str scheme, bint proxy, long seen
)
