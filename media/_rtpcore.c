/* media._rtpcore: the lean RTP path's per-packet work in C (optional).
 *
 * What media/lean.py does 50 times a second per call and direction, without the Python
 * objects and calls around each step: build and send one RTP packet (header patched,
 * protected, sendto a prebuilt address), drain the polled sockets (epoll + recvmsg with
 * the kernel's arrival stamp), unprotect, parse a fixed header. SRTP itself stays
 * libsrtp's, the very library and contexts aiortc keyed: media/aiortc_hooks.py hands us
 * pylibsrtp's srtp_protect/srtp_unprotect and each session's srtp_t.
 *
 * Everything here runs on the event loop's thread with the GIL held (each system call is
 * non-blocking), and one static buffer serves every call. Built as an optional extension
 * (setup.py): without a C compiler media/lean.py runs its pure-Python equivalents, which
 * the tests hold this module to.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>

/* libsrtp 2's srtp_protect / srtp_unprotect: (srtp_t, void *packet, int *length) */
typedef int (*srtp_fn)(void *ctx, void *packet, int *length);

#define MAX_DATAGRAM 8192
#define SRTP_ROOM (16 + 128) /* what libsrtp may append: tag, MKI */
#define SRTP_MAX 2048        /* a packet and that room (as media.aiortc_hooks.FastSrtp) */
#define MAX_EVENTS 256

static srtp_fn protect_fn = NULL;
static srtp_fn unprotect_fn = NULL;
static PyObject *srtp_error = NULL; /* pylibsrtp.Error, as FastSrtp raises */
static unsigned char buffer[MAX_DATAGRAM + SRTP_ROOM];

/* ---------------------------------------------------------------- SRTP ------------ */

static PyObject *
bind_srtp(PyObject *module, PyObject *args)
{
    unsigned long long protect, unprotect;
    PyObject *error;
    if (!PyArg_ParseTuple(args, "KKO:bind_srtp", &protect, &unprotect, &error))
        return NULL;
    if (!protect || !unprotect || !PyExceptionClass_Check(error)) {
        PyErr_SetString(PyExc_ValueError, "bind_srtp needs two function addresses and an exception class");
        return NULL;
    }
    protect_fn = (srtp_fn)(uintptr_t)protect;
    unprotect_fn = (srtp_fn)(uintptr_t)unprotect;
    Py_INCREF(error);
    Py_XSETREF(srtp_error, error);
    Py_RETURN_NONE;
}

/* Run libsrtp over buffer[0:*length] in place; -1 with an exception set on failure. */
static int
run_srtp(srtp_fn fn, unsigned long long ctx, int *length)
{
    if (fn == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "media._rtpcore: bind_srtp was not called");
        return -1;
    }
    int status = fn((void *)(uintptr_t)ctx, buffer, length);
    if (status) {
        PyErr_Format(srtp_error, "libsrtp status %d", status);
        return -1;
    }
    return 0;
}

static PyObject *
srtp(PyObject *module, PyObject *args)
{
    unsigned long long ctx;
    Py_buffer data;
    int protect;
    if (!PyArg_ParseTuple(args, "Kpy*:srtp", &ctx, &protect, &data))
        return NULL;
    if (data.len > SRTP_MAX - (protect ? SRTP_ROOM : 0)) {
        PyBuffer_Release(&data);
        PyErr_SetString(srtp_error ? srtp_error : PyExc_ValueError, "packet is too long");
        return NULL;
    }
    int length = (int)data.len;
    memcpy(buffer, data.buf, data.len);
    PyBuffer_Release(&data);
    if (run_srtp(protect ? protect_fn : unprotect_fn, ctx, &length) < 0)
        return NULL;
    return PyBytes_FromStringAndSize((const char *)buffer, length);
}

/* ------------------------------------------------------------- sending ------------ */

static PyObject *
sockaddr_of(PyObject *module, PyObject *addr)
{
    const char *host;
    unsigned int port;
    unsigned int flowinfo = 0, scope_id = 0;
    if (!PyArg_ParseTuple(addr, "sI|II:sockaddr", &host, &port, &flowinfo, &scope_id))
        return NULL;
    if (port > 65535) {
        PyErr_SetString(PyExc_ValueError, "port out of range");
        return NULL;
    }
    struct sockaddr_in v4;
    memset(&v4, 0, sizeof v4);
    if (inet_pton(AF_INET, host, &v4.sin_addr) == 1) {
        v4.sin_family = AF_INET;
        v4.sin_port = htons((uint16_t)port);
        return PyBytes_FromStringAndSize((const char *)&v4, sizeof v4);
    }
    struct sockaddr_in6 v6;
    memset(&v6, 0, sizeof v6);
    if (inet_pton(AF_INET6, host, &v6.sin6_addr) == 1) {
        v6.sin6_family = AF_INET6;
        v6.sin6_port = htons((uint16_t)port);
        v6.sin6_flowinfo = htonl(flowinfo);
        v6.sin6_scope_id = scope_id;
        return PyBytes_FromStringAndSize((const char *)&v6, sizeof v6);
    }
    PyErr_Format(PyExc_ValueError, "not an IP address: %s", host);
    return NULL;
}

/* send_rtp(fd, sockaddr, ctx, header, seq, timestamp, payload) -> the packet's length
 * on the wire, negated when the kernel's buffer was full (dropped, as UDP would); OSError
 * for anything else. ctx 0: plain RTP. */
static PyObject *
send_rtp(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "send_rtp takes 7 arguments");
        return NULL;
    }
    int fd = PyLong_AsLong(args[0]);
    unsigned long long ctx = PyLong_AsUnsignedLongLong(args[2]);
    unsigned long seq = PyLong_AsUnsignedLong(args[4]);
    unsigned long timestamp = PyLong_AsUnsignedLong(args[5]);
    if (PyErr_Occurred())
        return NULL;
    if (!PyBytes_Check(args[1]) || !PyBytes_Check(args[6])) {
        PyErr_SetString(PyExc_TypeError, "send_rtp: the address and the payload are bytes");
        return NULL;
    }
    Py_buffer header;
    if (PyObject_GetBuffer(args[3], &header, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t hlen = header.len, plen = PyBytes_GET_SIZE(args[6]);
    if (hlen < 12 || hlen + plen > SRTP_MAX - SRTP_ROOM) {
        PyBuffer_Release(&header);
        PyErr_SetString(PyExc_ValueError, "send_rtp: bad header or packet too long");
        return NULL;
    }
    memcpy(buffer, header.buf, hlen);
    PyBuffer_Release(&header);
    buffer[2] = (unsigned char)(seq >> 8);
    buffer[3] = (unsigned char)seq;
    buffer[4] = (unsigned char)(timestamp >> 24);
    buffer[5] = (unsigned char)(timestamp >> 16);
    buffer[6] = (unsigned char)(timestamp >> 8);
    buffer[7] = (unsigned char)timestamp;
    memcpy(buffer + hlen, PyBytes_AS_STRING(args[6]), plen);
    int length = (int)(hlen + plen);
    if (ctx && run_srtp(protect_fn, ctx, &length) < 0)
        return NULL;
    ssize_t sent = sendto(fd, buffer, length, MSG_DONTWAIT, (const struct sockaddr *)PyBytes_AS_STRING(args[1]),
                          (socklen_t)PyBytes_GET_SIZE(args[1]));
    if (sent < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR || errno == ENOBUFS)
            return PyLong_FromLong(-length);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(length);
}

/* ------------------------------------------------------------ receiving ----------- */

/* The last sender's address per descriptor, as a Python tuple: one peer per socket,
 * so building ("127.0.0.1", 40000) for every datagram is mostly avoided. */
#define ADDR_SLOTS 1024
static struct {
    int fd;
    socklen_t len;
    struct sockaddr_storage raw;
    PyObject *tuple;
} addr_cache[ADDR_SLOTS];

static PyObject *
address_of(int fd, const struct sockaddr_storage *raw, socklen_t len)
{
    unsigned slot = (unsigned)fd % ADDR_SLOTS;
    if (addr_cache[slot].tuple != NULL && addr_cache[slot].fd == fd && addr_cache[slot].len == len &&
        memcmp(&addr_cache[slot].raw, raw, len) == 0) {
        Py_INCREF(addr_cache[slot].tuple);
        return addr_cache[slot].tuple;
    }
    char host[INET6_ADDRSTRLEN];
    PyObject *tuple;
    if (raw->ss_family == AF_INET) {
        const struct sockaddr_in *v4 = (const struct sockaddr_in *)raw;
        inet_ntop(AF_INET, &v4->sin_addr, host, sizeof host);
        tuple = Py_BuildValue("(si)", host, ntohs(v4->sin_port));
    } else if (raw->ss_family == AF_INET6) {
        const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)raw;
        inet_ntop(AF_INET6, &v6->sin6_addr, host, sizeof host);
        tuple = Py_BuildValue("(siII)", host, ntohs(v6->sin6_port), ntohl(v6->sin6_flowinfo), v6->sin6_scope_id);
    } else {
        Py_RETURN_NONE;
    }
    if (tuple == NULL)
        return NULL;
    Py_XSETREF(addr_cache[slot].tuple, Py_NewRef(tuple));
    addr_cache[slot].fd = fd;
    addr_cache[slot].len = len;
    memcpy(&addr_cache[slot].raw, raw, len);
    return tuple;
}

/* drain(epfd, rounds, offset, now) -> [(fd, data, addr, at) | (fd, None, errno, now)]
 *
 * Asks the epoll set which sockets have datagrams, reads one from each, and asks again,
 * for at most ``rounds`` rounds (a flood on one socket cannot hold the loop). ``at`` is
 * the kernel's arrival stamp (wall clock) minus ``offset`` (so: the loop's clock), or
 * ``now`` without one. Truncated datagrams are dropped; a socket's error is reported. */
static PyObject *
drain(PyObject *module, PyObject *args)
{
    int epfd, rounds;
    double offset, now;
    if (!PyArg_ParseTuple(args, "iidd:drain", &epfd, &rounds, &offset, &now))
        return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    struct epoll_event events[MAX_EVENTS];
    union {
        char space[CMSG_SPACE(sizeof(struct timespec))];
        struct cmsghdr align;
    } control;
    for (int round = 0; round < rounds; round++) {
        int ready = epoll_wait(epfd, events, MAX_EVENTS, 0);
        if (ready < 0) {
            if (errno == EINTR)
                continue;
            Py_DECREF(out);
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        if (ready == 0)
            break;
        for (int i = 0; i < ready; i++) {
            int fd = events[i].data.fd;
            struct sockaddr_storage from;
            struct iovec iov = {buffer, MAX_DATAGRAM};
            struct msghdr msg;
            memset(&msg, 0, sizeof msg);
            msg.msg_name = &from;
            msg.msg_namelen = sizeof from;
            msg.msg_iov = &iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.space;
            msg.msg_controllen = sizeof control.space;
            ssize_t n = recvmsg(fd, &msg, MSG_DONTWAIT);
            PyObject *item;
            if (n < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
                    continue;
                item = Py_BuildValue("(iOid)", fd, Py_None, errno, now);
            } else {
                if (msg.msg_flags & MSG_TRUNC)
                    continue; /* larger than anything a media peer sends after the handshakes */
                double at = now;
                for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
                    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS &&
                        c->cmsg_len >= CMSG_LEN(sizeof(struct timespec))) {
                        struct timespec stamp;
                        memcpy(&stamp, CMSG_DATA(c), sizeof stamp);
                        at = (double)stamp.tv_sec + (double)stamp.tv_nsec * 1e-9 - offset;
                    }
                }
                PyObject *addr = address_of(fd, &from, msg.msg_namelen);
                if (addr == NULL) {
                    Py_DECREF(out);
                    return NULL;
                }
                PyObject *data = PyBytes_FromStringAndSize((const char *)buffer, n);
                item = data == NULL ? NULL : Py_BuildValue("(iNNd)", fd, data, addr, at);
                if (data == NULL)
                    Py_DECREF(addr);
            }
            if (item == NULL || PyList_Append(out, item) < 0) {
                Py_XDECREF(item);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(item);
        }
    }
    return out;
}

/* ------------------------------------------------------------- RtpView ------------ */

typedef struct {
    PyObject_HEAD
    long payload_type;
    long marker;
    long sequence_number;
    unsigned int timestamp;
    unsigned int ssrc;
    PyObject *payload;
} RtpView;

static void
RtpView_dealloc(RtpView *self)
{
    Py_XDECREF(self->payload);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
RtpView_repr(RtpView *self)
{
    return PyUnicode_FromFormat("RtpView(pt=%ld, seq=%ld, ts=%u, %zd B)", self->payload_type,
                                self->sequence_number, self->timestamp, PyBytes_GET_SIZE(self->payload));
}

static PyMemberDef RtpView_members[] = {
    {"payload_type", T_LONG, offsetof(RtpView, payload_type), READONLY, NULL},
    {"marker", T_LONG, offsetof(RtpView, marker), READONLY, NULL},
    {"sequence_number", T_LONG, offsetof(RtpView, sequence_number), READONLY, NULL},
    {"timestamp", T_UINT, offsetof(RtpView, timestamp), READONLY, NULL},
    {"ssrc", T_UINT, offsetof(RtpView, ssrc), READONLY, NULL},
    {"payload", T_OBJECT_EX, offsetof(RtpView, payload), READONLY, NULL},
    {NULL},
};

static PyTypeObject RtpViewType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "media._rtpcore.RtpView",
    .tp_doc = "The fields of a received RTP packet the audio path reads (media.lean.RtpView's twin).",
    .tp_basicsize = sizeof(RtpView),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_dealloc = (destructor)RtpView_dealloc,
    .tp_repr = (reprfunc)RtpView_repr,
    .tp_members = RtpView_members,
};

/* parse_rtp(data) -> RtpView; ValueError as media.lean.parse_rtp raises it. */
static PyObject *
parse_rtp(PyObject *module, PyObject *arg)
{
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "parse_rtp takes bytes");
        return NULL;
    }
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(arg);
    Py_ssize_t n = PyBytes_GET_SIZE(arg);
    if (n < 12) {
        PyErr_SetString(PyExc_ValueError, "an RTP packet has at least 12 bytes");
        return NULL;
    }
    if (data[0] >> 6 != 2) {
        PyErr_SetString(PyExc_ValueError, "not RTP version 2");
        return NULL;
    }
    Py_ssize_t start = 12 + 4 * (data[0] & 0x0F);
    if (data[0] & 0x10) {
        if (n < start + 4) {
            PyErr_SetString(PyExc_ValueError, "truncated RTP header extension");
            return NULL;
        }
        start += 4 + 4 * (((Py_ssize_t)data[start + 2] << 8) | data[start + 3]);
    }
    Py_ssize_t end = n;
    if (data[0] & 0x20)
        end -= data[n - 1];
    if (start > end) {
        PyErr_SetString(PyExc_ValueError, "RTP lengths do not add up");
        return NULL;
    }
    RtpView *view = PyObject_New(RtpView, &RtpViewType);
    if (view == NULL)
        return NULL;
    view->payload = NULL;
    view->payload_type = data[1] & 0x7F;
    view->marker = data[1] >> 7;
    view->sequence_number = ((long)data[2] << 8) | data[3];
    view->timestamp = ((unsigned)data[4] << 24) | ((unsigned)data[5] << 16) | ((unsigned)data[6] << 8) | data[7];
    view->ssrc = ((unsigned)data[8] << 24) | ((unsigned)data[9] << 16) | ((unsigned)data[10] << 8) | data[11];
    view->payload = PyBytes_FromStringAndSize((const char *)data + start, end - start);
    if (view->payload == NULL) {
        Py_DECREF(view);
        return NULL;
    }
    return (PyObject *)view;
}

/* ---------------------------------------------------------------- module ---------- */

static PyMethodDef methods[] = {
    {"bind_srtp", bind_srtp, METH_VARARGS,
     "bind_srtp(protect, unprotect, error): libsrtp's srtp_protect/srtp_unprotect addresses and the exception to raise."},
    {"srtp", srtp, METH_VARARGS, "srtp(ctx, protect, data) -> bytes: protect (or unprotect) one packet."},
    {"sockaddr", sockaddr_of, METH_O, "sockaddr((host, port[, flowinfo, scope_id])) -> the C struct, for send_rtp."},
    {"send_rtp", (PyCFunction)(void (*)(void))send_rtp, METH_FASTCALL,
     "send_rtp(fd, sockaddr, ctx, header, seq, timestamp, payload) -> length on the wire (negative: dropped, buffer full)."},
    {"drain", drain, METH_VARARGS,
     "drain(epfd, rounds, offset, now) -> [(fd, data, addr, at)]; a socket's error as (fd, None, errno, now)."},
    {"parse_rtp", parse_rtp, METH_O, "parse_rtp(data) -> RtpView (ValueError when it is not RTP)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "media._rtpcore",
    "The lean RTP path's per-packet work in C (see media/lean.py).", -1, methods,
};

PyMODINIT_FUNC
PyInit__rtpcore(void)
{
    if (PyType_Ready(&RtpViewType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RtpViewType);
    if (PyModule_AddObject(m, "RtpView", (PyObject *)&RtpViewType) < 0) {
        Py_DECREF(&RtpViewType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "MAX_DATAGRAM", MAX_DATAGRAM);
    return m;
}
