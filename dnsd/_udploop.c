/* dnsd._udploop: the "mmsg" engine's receive loop in C (Linux).
 *
 * Theory of operation
 * -------------------
 * serve(fd, thread, batch, recv_size, send_size) runs until thread._stopping
 * is true after a receive returns (MmsgThread.stop shuts the socket down,
 * which wakes the receive). Each round takes every queued datagram with one
 * recvmmsg (MSG_WAITFORONE) and sends every answer with sendmmsg, the GIL
 * released around both calls, as dnsd/mmsg.py does through ctypes.
 *
 * Between them, a datagram that is a plain cached answer is answered here:
 * one question, class IN, no other record but an optional 11-byte OPT (EDNS
 * version 0, no options), a question (its name lowercased) found in table.questions,
 * flags clear of QR and opcode, and an answer that fits without truncation.
 * That is exactly Answerer.respond's fast path in dnsd/respond.py, with the
 * same entry fields read the same way: the entry's ``served`` counter steps
 * (``node_step()`` with workers = N), the response is the query's ID and the
 * pre-assembled bytes (``full``) or header + the client's question + body
 * (+ our OPT) when the client spelled the name in another case (0x20).
 * Every other datagram (a miss, options, truncation, a malformed message)
 * goes to thread._answer_one(data, sender), the Python path, unchanged.
 * With RRL on, every answer made here is passed to thread._limit(data,
 * sender, key), which returns 0 to send it, 1 to drop it, or the bytes to
 * send instead (the slip).
 *
 * The interpreter work per answer of the Python loop (about 1.2 us of ~4.3 us
 * on this project's machine, bench/README-dns.md) is what this removes.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define NAME_SIZE 128 /* sizeof(struct sockaddr_storage) */
#define MAX_QUESTION 300 /* a wire name is at most 255 bytes, + type and class */

static PyObject *s_questions, *s_served, *s_shared, *s_node_step, *s_period, *s_full, *s_heads,
    *s_heads_edns, *s_do_heads, *s_schedule, *s_do_schedule, *s_fit_plain, *s_body_len, *s_do_body_len,
    *s_rrl_key, *s_payload_size, *s_opt, *s_table, *s_server, *s_stopping, *s_answer_one, *s_limit, *s_rrl,
    *s_failed;

static const unsigned char ONE_QUESTION[8] = {0, 1, 0, 0, 0, 0, 0, 0};
static const unsigned char ONE_QUESTION_ONE_EXTRA[8] = {0, 1, 0, 0, 0, 0, 0, 1};

/* An attribute as a C long (-1 with an exception set on failure). */
static long long_attr(PyObject *obj, PyObject *name) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL) return -1;
    long r = PyLong_AsLong(v);
    Py_DECREF(v);
    return r;
}

/* Item i of a sequence (a new reference); lists without a call. */
static PyObject *item(PyObject *seq, Py_ssize_t i) {
    if (PyList_CheckExact(seq)) {
        if (i < 0 || i >= PyList_GET_SIZE(seq)) {
            PyErr_SetString(PyExc_IndexError, "index out of range");
            return NULL;
        }
        PyObject *v = PyList_GET_ITEM(seq, i);
        Py_INCREF(v);
        return v;
    }
    return PySequence_GetItem(seq, i);
}

/* Append bytes object b at out (bounded by end); -1 with an exception, -2 when it does not fit. */
static int put(unsigned char **out, unsigned char *end, PyObject *b) {
    if (!PyBytes_Check(b)) {
        PyErr_SetString(PyExc_TypeError, "prepared answer parts must be bytes");
        return -1;
    }
    Py_ssize_t n = PyBytes_GET_SIZE(b);
    if (*out + n > end) return -2;
    memcpy(*out, PyBytes_AS_STRING(b), n);
    *out += n;
    return 0;
}

/* The fast path for one datagram.
 *
 * Returns the answer's length written at buf (at most cap bytes), 0 when the
 * datagram must take the Python path (nothing was changed: the served
 * counter has not moved), -2 when the answer does not fit our send buffer (it
 * is dropped, as the Python loop does), -1 with an exception set. *key gets
 * a new reference to the entry's RRL key when an answer is made.
 */
static Py_ssize_t fast_answer(PyObject *table, PyObject *questions, const unsigned char *q, Py_ssize_t len,
                              unsigned char *buf, Py_ssize_t cap, PyObject **key) {
    if (len < 17 || (q[2] & 0xF8)) return 0; /* too short for a question; QR or an opcode */
    const unsigned char *zero = memchr(q + 12, 0, len - 12);
    if (zero == NULL) return 0;
    Py_ssize_t end = zero - q, qend = end + 5;
    if (qend > len || qend - 12 > MAX_QUESTION) return 0;
    unsigned char low[MAX_QUESTION];
    int exact = 1;
    for (Py_ssize_t i = 12; i <= end; i++) {
        unsigned char c = q[i];
        if (c >= 'A' && c <= 'Z') { /* bytes.lower() of the name: ASCII letters only */
            c += 32;
            exact = 0;
        }
        low[i - 12] = c;
    }
    /* Type and class as sent: lowercased, HTTPS (65, 'A') would miss its entry
       (build.py, _alias_free). */
    memcpy(low + end + 1 - 12, q + end + 1, 4);
    PyObject *lkey = PyBytes_FromStringAndSize((const char *)low, qend - 12);
    if (lkey == NULL) return -1;
    PyObject *entry = PyDict_GetItemWithError(questions, lkey); /* borrowed */
    Py_DECREF(lkey);
    if (entry == NULL) return PyErr_Occurred() ? -1 : 0;
    Py_INCREF(entry);

    Py_ssize_t result = -1;
    PyObject *served = NULL, *next = NULL, *shared = NULL, *parts = NULL, *part = NULL, *opt = NULL;
    int edns = 0;
    if (len == qend && memcmp(q + 4, ONE_QUESTION, 8) == 0) {
        long fit = long_attr(entry, s_fit_plain);
        if (fit == -1 && PyErr_Occurred()) goto done;
        if (qend > fit) { /* over 512 bytes without EDNS: truncated, by the Python path */
            result = 0;
            goto done;
        }
    } else if (len == qend + 11 && memcmp(q + 4, ONE_QUESTION_ONE_EXTRA, 8) == 0 && q[qend] == 0 &&
               q[qend + 1] == 0 && q[qend + 2] == 41 && q[qend + 6] == 0 && q[qend + 9] == 0 &&
               q[qend + 10] == 0) {
        /* One OPT record, version 0, no options (RFC 6891 §6.1.2). */
        edns = 1 + (q[qend + 7] >> 7);
        long payload = (q[qend + 3] << 8) | q[qend + 4];
        if (payload < 512) payload = 512;
        long body = long_attr(entry, edns == 2 ? s_do_body_len : s_body_len);
        if (body == -1 && PyErr_Occurred()) goto done;
        if (qend + 11 + body > 512) {
            long ours = long_attr(table, s_payload_size);
            if (ours == -1 && PyErr_Occurred()) goto done;
            if (qend + 11 + body > (payload < ours ? payload : ours)) {
                result = 0; /* truncated, by the Python path */
                goto done;
            }
        }
    } else {
        result = 0;
        goto done;
    }

    /* The rotation step: this entry's counter, or the node's with workers = N. */
    served = PyObject_GetAttr(entry, s_served);
    if (served == NULL) goto done;
    Py_ssize_t count = PyLong_AsSsize_t(served);
    if (count == -1 && PyErr_Occurred()) goto done;
    next = PyLong_FromSsize_t(count + 1);
    if (next == NULL || PyObject_SetAttr(entry, s_served, next) < 0) goto done;
    shared = PyObject_GetAttr(entry, s_shared);
    if (shared == NULL) goto done;
    Py_ssize_t n;
    if (shared != Py_None) {
        PyObject *step = PyObject_CallMethodNoArgs(entry, s_node_step);
        if (step == NULL) goto done;
        n = PyLong_AsSsize_t(step);
        Py_DECREF(step);
    } else {
        n = count;
    }
    if (n == -1 && PyErr_Occurred()) goto done;
    long period = long_attr(entry, s_period);
    if (period == -1 && PyErr_Occurred()) goto done;
    if (period <= 0) {
        PyErr_SetString(PyExc_ValueError, "entry without a schedule");
        goto done;
    }
    Py_ssize_t slot = n % period;
    int rdcd = (q[2] & 1) | (q[3] & 0x10);

    unsigned char *out = buf, *stop = buf + cap;
    if (cap < 2) {
        result = -2;
        goto done;
    }
    out[0] = q[0];
    out[1] = q[1];
    out += 2;
    int fit;
    parts = PyObject_GetAttr(entry, s_full);
    if (parts == NULL) goto done;
    if (parts != Py_None && exact) {
        PyObject *variant = item(parts, edns * 18 + rdcd);
        if (variant == NULL) goto done;
        part = item(variant, slot);
        Py_DECREF(variant);
        if (part == NULL) goto done;
        fit = put(&out, stop, part);
    } else {
        /* Header, the client's question as sent (0x20 case kept), body, OPT. */
        Py_CLEAR(parts);
        parts = PyObject_GetAttr(entry, edns == 0 ? s_heads : edns == 1 ? s_heads_edns : s_do_heads);
        if (parts == NULL) goto done;
        part = item(parts, rdcd);
        if (part == NULL) goto done;
        fit = put(&out, stop, part);
        if (fit == 0) {
            if (out + (qend - 12) > stop) {
                fit = -2;
            } else {
                memcpy(out, q + 12, qend - 12);
                out += qend - 12;
            }
        }
        if (fit == 0) {
            Py_CLEAR(parts);
            Py_CLEAR(part);
            parts = PyObject_GetAttr(entry, edns == 2 ? s_do_schedule : s_schedule);
            if (parts == NULL) goto done;
            part = item(parts, slot);
            if (part == NULL) goto done;
            fit = put(&out, stop, part);
        }
        if (fit == 0 && edns) {
            PyObject *opts = PyObject_GetAttr(table, s_opt);
            if (opts == NULL) goto done;
            opt = item(opts, edns - 1);
            Py_DECREF(opts);
            if (opt == NULL) goto done;
            fit = put(&out, stop, opt);
        }
    }
    if (fit == -1) goto done;
    if (fit == -2) {
        result = -2;
        goto done;
    }
    *key = PyObject_GetAttr(entry, s_rrl_key);
    if (*key == NULL) goto done;
    result = out - buf;
done:
    Py_XDECREF(served);
    Py_XDECREF(next);
    Py_XDECREF(shared);
    Py_XDECREF(parts);
    Py_XDECREF(part);
    Py_XDECREF(opt);
    Py_DECREF(entry);
    return result;
}

/* Hand the current exception to thread._failed (which logs it); never raises. */
static void report_failure(PyObject *thread) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (value != NULL && tb != NULL) PyException_SetTraceback(value, tb);
    PyObject *r = PyObject_CallMethodOneArg(thread, s_failed, value != NULL ? value : Py_None);
    if (r == NULL) PyErr_Clear();
    Py_XDECREF(r);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
}

/* answer(query, table) -> (response, rrl_key) or None: the fast path alone, for tests. */
static PyObject *udploop_answer(PyObject *self, PyObject *args) {
    Py_buffer query;
    PyObject *table;
    if (!PyArg_ParseTuple(args, "y*O", &query, &table)) return NULL;
    PyObject *result = NULL, *key = NULL;
    PyObject *questions = PyObject_GetAttr(table, s_questions);
    unsigned char buf[65536];
    if (questions != NULL) {
        Py_ssize_t n = fast_answer(table, questions, query.buf, query.len, buf, sizeof buf, &key);
        if (n > 0) {
            result = Py_BuildValue("(y#N)", (const char *)buf, n, key);
        } else if (n == 0 || n == -2) {
            result = Py_NewRef(Py_None);
        }
        Py_DECREF(questions);
    }
    PyBuffer_Release(&query);
    return result;
}

typedef struct {
    struct mmsghdr *recv, *send;
    struct iovec *riov, *siov;
    unsigned char *rdata, *sdata, *names;
} Buffers;

static void free_buffers(Buffers *b) {
    PyMem_RawFree(b->recv);
    PyMem_RawFree(b->send);
    PyMem_RawFree(b->riov);
    PyMem_RawFree(b->siov);
    PyMem_RawFree(b->rdata);
    PyMem_RawFree(b->sdata);
    PyMem_RawFree(b->names);
}

static PyObject *udploop_serve(PyObject *self, PyObject *args) {
    int fd, batch;
    Py_ssize_t rsize, ssize;
    PyObject *thread;
    if (!PyArg_ParseTuple(args, "iOinn", &fd, &thread, &batch, &rsize, &ssize)) return NULL;
    if (batch <= 0 || batch > 1024 || rsize <= 0 || ssize <= 0) {
        PyErr_SetString(PyExc_ValueError, "bad batch or buffer size");
        return NULL;
    }
    PyObject *server = PyObject_GetAttr(thread, s_server);
    if (server == NULL) return NULL;
    PyObject *rrl = PyObject_GetAttr(thread, s_rrl);
    if (rrl == NULL) {
        Py_DECREF(server);
        return NULL;
    }
    int limited = rrl != Py_None;
    Py_DECREF(rrl);

    Buffers b;
    b.recv = PyMem_RawCalloc(batch, sizeof(struct mmsghdr));
    b.send = PyMem_RawCalloc(batch, sizeof(struct mmsghdr));
    b.riov = PyMem_RawCalloc(batch, sizeof(struct iovec));
    b.siov = PyMem_RawCalloc(batch, sizeof(struct iovec));
    b.rdata = PyMem_RawMalloc(batch * rsize);
    b.sdata = PyMem_RawMalloc(batch * ssize);
    b.names = PyMem_RawCalloc(batch, NAME_SIZE);
    if (!b.recv || !b.send || !b.riov || !b.siov || !b.rdata || !b.sdata || !b.names) {
        free_buffers(&b);
        Py_DECREF(server);
        return PyErr_NoMemory();
    }
    for (int i = 0; i < batch; i++) {
        b.riov[i].iov_base = b.rdata + rsize * i;
        b.riov[i].iov_len = rsize;
        b.recv[i].msg_hdr.msg_iov = &b.riov[i];
        b.recv[i].msg_hdr.msg_iovlen = 1;
        b.recv[i].msg_hdr.msg_name = b.names + NAME_SIZE * i;
        b.siov[i].iov_base = b.sdata + ssize * i;
        b.send[i].msg_hdr.msg_iov = &b.siov[i];
        b.send[i].msg_hdr.msg_iovlen = 1;
    }
    long send_errors = 0;
    PyObject *result = NULL;
    for (;;) {
        for (int i = 0; i < batch; i++) b.recv[i].msg_hdr.msg_namelen = NAME_SIZE;
        int n, err;
        Py_BEGIN_ALLOW_THREADS;
        n = recvmmsg(fd, b.recv, batch, MSG_WAITFORONE, NULL);
        err = errno;
        Py_END_ALLOW_THREADS;
        PyObject *flag = PyObject_GetAttr(thread, s_stopping);
        int stopping = flag == NULL ? 1 : PyObject_IsTrue(flag);
        Py_XDECREF(flag);
        if (stopping) {
            PyErr_Clear(); /* a thread without the flag cannot be told to stop: stop now */
            break;
        }
        if (n <= 0) {
            if (n < 0 && err != EINTR && err != EAGAIN) {
                PyObject *r = PyObject_CallMethod(thread, "_recv_failed", "i", err);
                if (r == NULL) report_failure(thread);
                Py_XDECREF(r);
            }
            continue;
        }
        PyObject *table = PyObject_GetAttr(server, s_table);
        PyObject *questions = table != NULL ? PyObject_GetAttr(table, s_questions) : NULL;
        if (questions == NULL) {
            Py_XDECREF(table);
            report_failure(thread);
            continue;
        }
        int out = 0;
        for (int i = 0; i < n; i++) {
            Py_ssize_t size = b.recv[i].msg_len;
            if (size == 0) continue;
            const unsigned char *data = b.rdata + rsize * i;
            unsigned char *dest = b.sdata + ssize * out;
            const unsigned char *name = b.names + NAME_SIZE * i;
            socklen_t namelen = b.recv[i].msg_hdr.msg_namelen;
            PyObject *key = NULL, *answer = NULL;
            Py_ssize_t length = fast_answer(table, questions, data, size, dest, ssize, &key);
            if (length == 0) {
                /* The Python path: Answerer.respond and the rest, as the Python loop does. */
                PyObject *pdata = PyBytes_FromStringAndSize((const char *)data, size);
                PyObject *pname = PyBytes_FromStringAndSize((const char *)name, namelen);
                if (pdata && pname) answer = PyObject_CallMethodObjArgs(thread, s_answer_one, pdata, pname, NULL);
                Py_XDECREF(pdata);
                Py_XDECREF(pname);
            } else if (length > 0 && limited) {
                PyObject *pdata = PyBytes_FromStringAndSize((const char *)data, size);
                PyObject *pname = PyBytes_FromStringAndSize((const char *)name, namelen);
                PyObject *verdict =
                    (pdata && pname) ? PyObject_CallMethodObjArgs(thread, s_limit, pdata, pname, key, NULL) : NULL;
                Py_XDECREF(pdata);
                Py_XDECREF(pname);
                if (verdict == NULL) {
                    length = -1;
                } else if (PyBytes_Check(verdict)) {
                    answer = verdict; /* the slip: send this instead */
                    length = 0;
                } else {
                    if (PyObject_IsTrue(verdict)) length = -2; /* dropped */
                    Py_DECREF(verdict);
                }
            }
            Py_XDECREF(key);
            if (length == 0) {
                if (answer == NULL) {
                    if (PyErr_Occurred()) report_failure(thread);
                    continue;
                }
                if (answer != Py_None && PyBytes_Check(answer) && PyBytes_GET_SIZE(answer) <= ssize) {
                    length = PyBytes_GET_SIZE(answer);
                    memcpy(dest, PyBytes_AS_STRING(answer), length);
                }
                Py_DECREF(answer);
                if (length == 0) continue; /* silence, or larger than our UDP size */
            }
            if (length < 0) {
                if (length == -1) report_failure(thread);
                continue;
            }
            b.siov[out].iov_len = length;
            b.send[out].msg_hdr.msg_name = (void *)name;
            b.send[out].msg_hdr.msg_namelen = namelen;
            out++;
        }
        Py_DECREF(questions);
        Py_DECREF(table);
        int done = 0;
        while (done < out) {
            int sent;
            Py_BEGIN_ALLOW_THREADS;
            sent = sendmmsg(fd, b.send + done, out - done, 0);
            Py_END_ALLOW_THREADS;
            if (sent <= 0) {
                send_errors++; /* this destination refused: skip it */
                done++;
            } else {
                done += sent;
            }
        }
        if (send_errors) {
            PyObject *r = PyObject_CallMethod(thread, "_count_send_errors", "l", send_errors);
            if (r == NULL) report_failure(thread);
            Py_XDECREF(r);
            send_errors = 0;
        }
    }
    result = Py_NewRef(Py_None);
    free_buffers(&b);
    Py_DECREF(server);
    return result;
}

static PyMethodDef methods[] = {
    {"serve", udploop_serve, METH_VARARGS,
     "serve(fd, thread, batch, recv_size, send_size): the receive/answer/send loop until thread._stopping."},
    {"answer", udploop_answer, METH_VARARGS,
     "answer(query, table) -> (response, rrl_key) or None: the loop's fast path alone (None: the "
     "Python path answers it)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "dnsd._udploop",
                                    "The mmsg UDP engine's receive loop in C (see dnsd/mmsg.py).", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__udploop(void) {
#define INTERN(var, text)                                    \
    if ((var = PyUnicode_InternFromString(text)) == NULL) { \
        return NULL;                                         \
    }
    INTERN(s_questions, "questions");
    INTERN(s_served, "served");
    INTERN(s_shared, "shared");
    INTERN(s_node_step, "node_step");
    INTERN(s_period, "period");
    INTERN(s_full, "full");
    INTERN(s_heads, "heads");
    INTERN(s_heads_edns, "heads_edns");
    INTERN(s_do_heads, "do_heads");
    INTERN(s_schedule, "schedule");
    INTERN(s_do_schedule, "do_schedule");
    INTERN(s_fit_plain, "fit_plain");
    INTERN(s_body_len, "body_len");
    INTERN(s_do_body_len, "do_body_len");
    INTERN(s_rrl_key, "rrl_key");
    INTERN(s_payload_size, "payload_size");
    INTERN(s_opt, "opt");
    INTERN(s_table, "table");
    INTERN(s_server, "server");
    INTERN(s_stopping, "_stopping");
    INTERN(s_answer_one, "_answer_one");
    INTERN(s_limit, "_limit");
    INTERN(s_rrl, "rrl");
    INTERN(s_failed, "_failed");
#undef INTERN
    return PyModule_Create(&module);
}
