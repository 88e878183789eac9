/* media._rtpcore: the lean RTP path's per-packet work in C (optional).
 *
 * What media/lean.py does 50 times a second per call and direction, without the Python
 * objects and calls around each step: build and send one RTP packet (header patched,
 * protected, sendto a prebuilt address), drain the polled sockets (epoll + recvmsg with
 * the kernel's arrival stamp), unprotect, parse a fixed header; and place each leg's
 * packets in stereo.ogg's slots (OpusRing). SRTP itself stays
 * libsrtp's, the very library and contexts aiortc keyed: media/aiortc_hooks.py hands us
 * pylibsrtp's srtp_protect/srtp_unprotect and each session's srtp_t.
 *
 * Everything here runs with the GIL held (each system call is non-blocking), and one
 * static buffer serves every call: what is in it is copied out before anything that
 * could run Python code (a tuple's allocation may run the garbage collector). Built as an optional extension
 * (setup.py): without a C compiler media/lean.py runs its pure-Python equivalents, which
 * the tests hold this module to.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

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

/* What rtp_out did with a packet. */
#define RTP_SENT 0
#define RTP_DROPPED 1        /* the kernel's buffer was full: lost, as UDP would */
#define RTP_FAILED (-1)      /* SRTP failed: an exception is set */
#define RTP_SOCKET_ERROR (-2) /* sendto failed otherwise: errno says why */

/* One RTP packet out: the header (hlen bytes) with seq and timestamp patched in, the
 * payload after it, protected with ctx (0: plain RTP), sent to addr; *length: its size. */
static int
rtp_out(int fd, const struct sockaddr *addr, socklen_t alen, unsigned long long ctx, const void *header,
        Py_ssize_t hlen, unsigned long seq, unsigned long timestamp, const void *payload, Py_ssize_t plen,
        int *length)
{
    memcpy(buffer, header, hlen);
    buffer[2] = (unsigned char)(seq >> 8);
    buffer[3] = (unsigned char)seq;
    buffer[4] = (unsigned char)(timestamp >> 24);
    buffer[5] = (unsigned char)(timestamp >> 16);
    buffer[6] = (unsigned char)(timestamp >> 8);
    buffer[7] = (unsigned char)timestamp;
    memcpy(buffer + hlen, payload, plen);
    *length = (int)(hlen + plen);
    if (ctx && run_srtp(protect_fn, ctx, length) < 0)
        return RTP_FAILED;
    if (sendto(fd, buffer, *length, MSG_DONTWAIT, addr, alen) >= 0)
        return RTP_SENT;
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR || errno == ENOBUFS)
        return RTP_DROPPED;
    return RTP_SOCKET_ERROR;
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
    int length;
    int sent = rtp_out(fd, (const struct sockaddr *)PyBytes_AS_STRING(args[1]), (socklen_t)PyBytes_GET_SIZE(args[1]),
                       ctx, header.buf, hlen, seq, timestamp, PyBytes_AS_STRING(args[6]), plen, &length);
    int error = errno;
    PyBuffer_Release(&header);
    if (sent == RTP_FAILED)
        return NULL;
    if (sent == RTP_SOCKET_ERROR) {
        errno = error;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(sent == RTP_DROPPED ? -length : length);
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

static PyObject *view_of(const unsigned char *data, Py_ssize_t n);

/* A routed socket's SRTP packet: unprotected in place (buffer[0:n]) and parsed.
 * 1: appended to ``rtp`` as (owner, plain, view or None, n, at); 0: not for the route
 * (not an SRTP packet of its payload types: the caller hands it on as it came);
 * -1: an exception is set. A packet libsrtp refuses is dropped (1), as aiortc drops it. */
static int
routed(PyObject *route, Py_ssize_t n, double at, PyObject *rtp)
{
    if (!PyTuple_Check(route) || PyTuple_GET_SIZE(route) != 3 || n < 12 || buffer[0] < 128 || buffer[0] >= 192)
        return 0;
    PyObject *types = PyTuple_GET_ITEM(route, 1);
    if (!PyBytes_Check(types) || PyBytes_GET_SIZE(types) != 128 || !PyBytes_AS_STRING(types)[buffer[1] & 0x7F])
        return 0;
    unsigned long long ctx = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(route, 0));
    if (ctx == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (unprotect_fn == NULL || ctx == 0)
        return 0;
    int length = (int)n;
    if (unprotect_fn((void *)(uintptr_t)ctx, buffer, &length))
        return 1;
    PyObject *plain = PyBytes_FromStringAndSize((const char *)buffer, length);
    if (plain == NULL)
        return -1;
    PyObject *view = view_of((const unsigned char *)PyBytes_AS_STRING(plain), length);
    if (view == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_ValueError)) {
            Py_DECREF(plain);
            return -1;
        }
        PyErr_Clear();
        view = Py_NewRef(Py_None);
    }
    PyObject *item = Py_BuildValue("(ONNnd)", PyTuple_GET_ITEM(route, 2), plain, view, n, at);
    if (item == NULL)
        return -1;
    int failed = PyList_Append(rtp, item);
    Py_DECREF(item);
    return failed ? -1 : 1;
}

/* drain(epfd, rounds, offset, now[, routes]) -> [(fd, data, addr, at) | (fd, None, errno, now)]
 *
 * Asks the epoll set which sockets have datagrams, reads one from each, and asks again,
 * for at most ``rounds`` rounds (a flood on one socket cannot hold the loop). ``at`` is
 * the kernel's arrival stamp (wall clock) minus ``offset`` (so: the loop's clock), or
 * ``now`` without one. Truncated datagrams are dropped; a socket's error is reported.
 *
 * ``routes`` ({fd: (srtp_t, payload types as 128 flag bytes, owner)}): a routed
 * socket's SRTP packets of those payload types are unprotected and parsed here, and
 * come back apart: the result is then ``(others, [(owner, plain, view, n, at)])``,
 * ``view`` ``None`` where the clear packet is not RTP, ``n`` its length on the wire. */
static PyObject *
drain(PyObject *module, PyObject *args)
{
    int epfd, rounds;
    double offset, now;
    PyObject *routes = NULL;
    if (!PyArg_ParseTuple(args, "iidd|O!:drain", &epfd, &rounds, &offset, &now, &PyDict_Type, &routes))
        return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    PyObject *rtp = NULL;
    if (routes != NULL && (rtp = PyList_New(0)) == NULL) {
        Py_DECREF(out);
        return NULL;
    }
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
            PyErr_SetFromErrno(PyExc_OSError);
            goto fail;
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
                if (routes != NULL && PyDict_GET_SIZE(routes)) {
                    PyObject *key = PyLong_FromLong(fd);
                    if (key == NULL)
                        goto fail;
                    PyObject *route = PyDict_GetItemWithError(routes, key);
                    Py_DECREF(key);
                    /* (held while used: an allocation in there may run the GC, and Python code) */
                    Py_XINCREF(route);
                    int done = route == NULL ? (PyErr_Occurred() ? -1 : 0) : routed(route, n, at, rtp);
                    Py_XDECREF(route);
                    if (done < 0)
                        goto fail;
                    if (done)
                        continue;
                }
                /* (the datagram leaves the shared buffer before anything that may run Python code) */
                PyObject *data = PyBytes_FromStringAndSize((const char *)buffer, n);
                if (data == NULL)
                    goto fail;
                PyObject *addr = address_of(fd, &from, msg.msg_namelen);
                if (addr == NULL) {
                    Py_DECREF(data);
                    goto fail;
                }
                item = Py_BuildValue("(iNNd)", fd, data, addr, at);
            }
            if (item == NULL || PyList_Append(out, item) < 0) {
                Py_XDECREF(item);
                goto fail;
            }
            Py_DECREF(item);
        }
    }
    if (rtp == NULL)
        return out;
    return Py_BuildValue("(NN)", out, rtp);
fail:
    Py_DECREF(out);
    Py_XDECREF(rtp);
    return NULL;
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

/* An RtpView of data[0:n], or NULL with ValueError as media.lean.parse_rtp raises it. */
static PyObject *
view_of(const unsigned char *data, Py_ssize_t n)
{
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

/* parse_rtp(data) -> RtpView; ValueError as media.lean.parse_rtp raises it. */
static PyObject *
parse_rtp(PyObject *module, PyObject *arg)
{
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "parse_rtp takes bytes");
        return NULL;
    }
    return view_of((const unsigned char *)PyBytes_AS_STRING(arg), PyBytes_GET_SIZE(arg));
}

/* ------------------------------------------------------------- OpusRing ----------- */
/* stereo.ogg's slots: media.sinks.stereo_opus.OpusRing is the reference (read its
 * docstrings); this does the same, with the same results, per packet without Python. */

#define FRAME 960      /* samples in a 20 ms slot at 48 kHz */
#define RATE 48000.0
#define PLACED 0
#define PUT_BACK 1
#define DROPPED 2
#define NOT_PLAIN 3

typedef struct {
    int has_pos, has_pts; /* (first_at is set with the first position) */
    long long pos, pts, resyncs;
    double first_at;
} Anchor;

typedef struct {
    PyObject_HEAD
    Py_ssize_t ring_len;
    long long max_delay, commit_chunk, resync;
    double t0;
    PyObject *silence[2];
    PyObject *write;
    unsigned char plain[256];
    long long committed;
    long long filled[2], ends[2], packets[2], late[2], dropped[2];
    Anchor anchors[2];
    PyObject **slots[2]; /* ring_len each; NULL: empty */
} OpusRing;

static long long
floor_div(long long a, long long b)
{
    long long q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

static long long
floor_mod(long long a, long long b)
{
    long long r = a % b;
    return (r != 0 && ((r < 0) != (b < 0))) ? r + b : r;
}

/* Anchor.place, where ``pts`` is absent unless has_pts. */
static long long
anchor_place(Anchor *a, int has_pts, long long pts, double at, long long arrived, long long end, long long limit)
{
    long long target;
    if (!a->has_pos) {
        a->first_at = at;
        target = arrived > 0 ? arrived : 0;
        a->has_pos = 1;
        a->pos = target;
        a->has_pts = has_pts;
        a->pts = pts;
    } else if (has_pts && a->has_pts) {
        target = a->pos + (pts - a->pts);
        long long off = arrived - target;
        if ((off < 0 ? -off : off) > limit) {
            a->pos = arrived;
            a->pts = pts;
            target = arrived;
            a->resyncs++;
        }
    } else {
        target = end;
        if (arrived - target > limit) {
            target = arrived;
            a->resyncs++;
        }
        a->pos = target;
        a->has_pts = has_pts;
        a->pts = pts;
    }
    return target;
}

static long long
ring_arrived(OpusRing *r, double at)
{
    return (long long)nearbyint((at - r->t0) * RATE); /* Python's round(): half to even */
}

/* Channel 0 or 1, else ValueError. */
static int
ring_channel(PyObject *arg)
{
    long c = PyLong_AsLong(arg);
    if (c == -1 && PyErr_Occurred())
        return -1;
    if (c != 0 && c != 1) {
        PyErr_SetString(PyExc_ValueError, "channel is 0 (left) or 1 (right)");
        return -1;
    }
    return (int)c;
}

/* pts: None or an int; 0 = absent, 1 = present, -1 = error. */
static int
ring_pts(PyObject *arg, long long *pts)
{
    if (arg == Py_None)
        return 0;
    *pts = PyLong_AsLongLong(arg);
    if (*pts == -1 && PyErr_Occurred())
        return -1;
    return 1;
}

static int
ring_commit(OpusRing *r, long long upto)
{
    long long begin = r->committed;
    if (upto <= begin)
        return 0;
    PyObject *packets = PyList_New((Py_ssize_t)(upto - begin));
    if (packets == NULL)
        return -1;
    for (long long slot = begin; slot < upto; slot++) {
        Py_ssize_t i = (Py_ssize_t)floor_mod(slot, r->ring_len);
        PyObject *side[2];
        for (int c = 0; c < 2; c++) {
            side[c] = r->slots[c][i];
            if (side[c] == NULL) {
                side[c] = r->silence[c];
                Py_INCREF(side[c]);
                r->filled[c]++;
            } else {
                r->slots[c][i] = NULL; /* (its reference is ours now) */
            }
        }
        Py_ssize_t nl = PyBytes_GET_SIZE(side[0]), nr = PyBytes_GET_SIZE(side[1]);
        PyObject *both = PyBytes_FromStringAndSize(NULL, nl + nr);
        if (both != NULL) {
            memcpy(PyBytes_AS_STRING(both), PyBytes_AS_STRING(side[0]), nl);
            memcpy(PyBytes_AS_STRING(both) + nl, PyBytes_AS_STRING(side[1]), nr);
        }
        Py_DECREF(side[0]);
        Py_DECREF(side[1]);
        if (both == NULL) {
            Py_DECREF(packets);
            return -1;
        }
        PyList_SET_ITEM(packets, (Py_ssize_t)(slot - begin), both);
    }
    r->committed = upto;
    PyObject *done = PyObject_CallOneArg(r->write, packets);
    Py_DECREF(packets);
    if (done == NULL)
        return -1;
    Py_DECREF(done);
    return 0;
}

/* _place: the next slot, or -1 with an exception (the write failed). Steals nothing. */
static long long
ring_place(OpusRing *r, int channel, long long slot, PyObject *payload, double now)
{
    long long committed = r->committed;
    if (slot < committed) {
        slot = committed;
        r->late[channel]++;
    }
    if (slot - committed >= r->ring_len && ring_commit(r, slot - r->ring_len + 1) < 0)
        return -1;
    Py_ssize_t i = (Py_ssize_t)floor_mod(slot, r->ring_len);
    PyObject *old = r->slots[channel][i];
    Py_INCREF(payload);
    r->slots[channel][i] = payload;
    Py_XDECREF(old);
    long long horizon = floor_div((long long)((now - r->t0) * RATE), FRAME) - r->max_delay;
    committed = r->committed;
    if (horizon - committed >= r->commit_chunk) {
        long long upto = committed + r->ring_len;
        if (ring_commit(r, horizon < upto ? horizon : upto) < 0)
            return -1;
    }
    return slot + 1;
}

static PyObject *
OpusRing_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    Py_ssize_t ring_len;
    long long max_delay, commit_chunk, resync;
    double t0;
    PyObject *left, *right, *write;
    Py_buffer plain;
    if (!PyArg_ParseTuple(args, "nLLLdSSy*O:OpusRing", &ring_len, &max_delay, &commit_chunk, &resync, &t0, &left,
                          &right, &plain, &write))
        return NULL;
    if (ring_len < 1 || plain.len != 256 || !PyCallable_Check(write)) {
        PyBuffer_Release(&plain);
        PyErr_SetString(PyExc_ValueError, "OpusRing: ring_len >= 1, plain: 256 flags, write: callable");
        return NULL;
    }
    OpusRing *r = (OpusRing *)type->tp_alloc(type, 0);
    if (r == NULL) {
        PyBuffer_Release(&plain);
        return NULL;
    }
    memcpy(r->plain, plain.buf, 256);
    PyBuffer_Release(&plain);
    r->ring_len = ring_len;
    r->max_delay = max_delay;
    r->commit_chunk = commit_chunk;
    r->resync = resync;
    r->t0 = t0;
    Py_INCREF(left);
    Py_INCREF(right);
    Py_INCREF(write);
    r->silence[0] = left;
    r->silence[1] = right;
    r->write = write;
    for (int c = 0; c < 2; c++) {
        r->slots[c] = PyMem_Calloc((size_t)ring_len, sizeof(PyObject *));
        if (r->slots[c] == NULL) {
            Py_DECREF(r);
            return PyErr_NoMemory();
        }
    }
    return (PyObject *)r;
}

static int
OpusRing_traverse(OpusRing *r, visitproc visit, void *arg)
{
    Py_VISIT(r->write);
    Py_VISIT(r->silence[0]);
    Py_VISIT(r->silence[1]);
    for (int c = 0; c < 2; c++)
        if (r->slots[c] != NULL)
            for (Py_ssize_t i = 0; i < r->ring_len; i++)
                Py_VISIT(r->slots[c][i]);
    return 0;
}

static int
OpusRing_clear(OpusRing *r)
{
    Py_CLEAR(r->write);
    Py_CLEAR(r->silence[0]);
    Py_CLEAR(r->silence[1]);
    for (int c = 0; c < 2; c++)
        if (r->slots[c] != NULL)
            for (Py_ssize_t i = 0; i < r->ring_len; i++)
                Py_CLEAR(r->slots[c][i]);
    return 0;
}

static void
OpusRing_dealloc(OpusRing *r)
{
    PyObject_GC_UnTrack(r);
    OpusRing_clear(r);
    PyMem_Free(r->slots[0]);
    PyMem_Free(r->slots[1]);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

/* A cleared ring (the garbage collector broke a cycle through it) takes nothing. */
static int
ring_alive(OpusRing *r)
{
    if (r->write == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "OpusRing was cleared");
        return 0;
    }
    return 1;
}

/* Place one stored packet (plain, or framed for the left channel): PLACED, PUT_BACK or
 * DROPPED, -1 with an exception when a commit's write failed. Steals nothing. */
static long
ring_packet(OpusRing *r, int channel, PyObject *stored, int has_pts, long long pts, double at)
{
    long long end = r->ends[channel];
    long long target = anchor_place(&r->anchors[channel], has_pts, pts, at, ring_arrived(r, at), end * FRAME,
                                    r->resync);
    long long slot = floor_div(target + FRAME / 2, FRAME);
    if (slot >= end) {
        long long next = ring_place(r, channel, slot, stored, at);
        if (next < 0 && PyErr_Occurred())
            return -1;
        r->ends[channel] = next;
        r->packets[channel]++;
        return PLACED;
    }
    if (slot >= r->committed && r->slots[channel][slot % r->ring_len] == NULL) {
        r->slots[channel][slot % r->ring_len] = stored; /* reordered: into its slot */
        Py_INCREF(stored);
        r->packets[channel]++;
        return PUT_BACK;
    }
    r->dropped[channel]++; /* its slot is taken (a duplicate) or already written */
    return DROPPED;
}

/* Whether the ring stores ``payload`` as it is on the right channel (see packet()). */
static int
ring_plain(OpusRing *r, PyObject *payload)
{
    Py_ssize_t n = PyBytes_GET_SIZE(payload);
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(payload);
    return n > 0 && n < 253 && r->plain[p[0]];
}

/* packet(channel, payload, pts, at[, stored]) -> PLACED, PUT_BACK, DROPPED or NOT_PLAIN */
static PyObject *
OpusRing_packet(OpusRing *r, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 4 || nargs > 5) {
        PyErr_SetString(PyExc_TypeError, "packet(channel, payload, pts, at[, stored])");
        return NULL;
    }
    if (!ring_alive(r))
        return NULL;
    int channel = ring_channel(args[0]);
    if (channel < 0)
        return NULL;
    PyObject *payload = args[1];
    if (!PyBytes_Check(payload)) {
        PyErr_SetString(PyExc_TypeError, "payload: bytes");
        return NULL;
    }
    long long pts = 0;
    int has_pts = ring_pts(args[2], &pts);
    if (has_pts < 0)
        return NULL;
    double at = PyFloat_AsDouble(args[3]);
    if (at == -1.0 && PyErr_Occurred())
        return NULL;
    PyObject *stored;
    if (nargs == 5 && args[4] != Py_None) {
        stored = args[4];
        if (!PyBytes_Check(stored)) {
            PyErr_SetString(PyExc_TypeError, "stored: bytes");
            return NULL;
        }
        Py_INCREF(stored);
    } else {
        if (!ring_plain(r, payload))
            return PyLong_FromLong(NOT_PLAIN);
        Py_ssize_t n = PyBytes_GET_SIZE(payload);
        const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(payload);
        if (channel == 0) { /* self-delimited: TOC, the frame's length, the frame */
            stored = PyBytes_FromStringAndSize(NULL, n + 1);
            if (stored == NULL)
                return NULL;
            unsigned char *s = (unsigned char *)PyBytes_AS_STRING(stored);
            s[0] = p[0];
            s[1] = (unsigned char)(n - 1);
            memcpy(s + 2, p + 1, n - 1);
        } else {
            stored = payload;
            Py_INCREF(stored);
        }
    }
    long result = ring_packet(r, channel, stored, has_pts, pts, at);
    Py_DECREF(stored);
    return result < 0 ? NULL : PyLong_FromLong(result);
}

/* emit(channel, stored, now): append at the leg's end. */
static PyObject *
OpusRing_emit(OpusRing *r, PyObject *args)
{
    PyObject *ch, *stored;
    double now;
    if (!PyArg_ParseTuple(args, "OSd:emit", &ch, &stored, &now) || !ring_alive(r))
        return NULL;
    int channel = ring_channel(ch);
    if (channel < 0)
        return NULL;
    long long next = ring_place(r, channel, r->ends[channel], stored, now);
    if (next < 0 && PyErr_Occurred())
        return NULL;
    r->ends[channel] = next;
    r->packets[channel]++;
    Py_RETURN_NONE;
}

/* anchor_place(channel, pts, at, end) -> target */
static PyObject *
OpusRing_anchor_place(OpusRing *r, PyObject *args)
{
    PyObject *ch, *pts_arg;
    double at;
    long long end, pts = 0;
    if (!PyArg_ParseTuple(args, "OOdL:anchor_place", &ch, &pts_arg, &at, &end))
        return NULL;
    int channel = ring_channel(ch);
    int has_pts = channel < 0 ? -1 : ring_pts(pts_arg, &pts);
    if (has_pts < 0)
        return NULL;
    return PyLong_FromLongLong(
        anchor_place(&r->anchors[channel], has_pts, pts, at, ring_arrived(r, at), end, r->resync));
}

static PyObject *
OpusRing_commit(OpusRing *r, PyObject *arg)
{
    long long upto = PyLong_AsLongLong(arg);
    if ((upto == -1 && PyErr_Occurred()) || !ring_alive(r) || ring_commit(r, upto) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* leg(channel) -> (packets, late, dropped, end, first_at, resyncs) */
static PyObject *
OpusRing_leg(OpusRing *r, PyObject *arg)
{
    int c = ring_channel(arg);
    if (c < 0)
        return NULL;
    Anchor *a = &r->anchors[c];
    PyObject *first = a->has_pos ? PyFloat_FromDouble(a->first_at) : Py_NewRef(Py_None);
    if (first == NULL)
        return NULL;
    return Py_BuildValue("(LLLLNL)", r->packets[c], r->late[c], r->dropped[c], r->ends[c], first, a->resyncs);
}

static PyObject *
OpusRing_set_end(OpusRing *r, PyObject *args)
{
    PyObject *ch;
    long long end;
    if (!PyArg_ParseTuple(args, "OL:set_end", &ch, &end))
        return NULL;
    int c = ring_channel(ch);
    if (c < 0)
        return NULL;
    r->ends[c] = end;
    Py_RETURN_NONE;
}

static PyObject *
OpusRing_get_filled(OpusRing *r, void *closure)
{
    return Py_BuildValue("[LL]", r->filled[0], r->filled[1]);
}

static PyObject *
OpusRing_get_committed(OpusRing *r, void *closure)
{
    return PyLong_FromLongLong(r->committed);
}

static PyMethodDef OpusRing_methods[] = {
    {"packet", (PyCFunction)(void (*)(void))OpusRing_packet, METH_FASTCALL,
     "packet(channel, payload, pts, at[, stored]) -> 0 placed, 1 put back, 2 dropped, 3 not a plain 20 ms packet."},
    {"emit", (PyCFunction)OpusRing_emit, METH_VARARGS, "emit(channel, stored, now): append at the leg's end."},
    {"anchor_place", (PyCFunction)OpusRing_anchor_place, METH_VARARGS,
     "anchor_place(channel, pts, at, end) -> the leg's anchor's target."},
    {"commit", (PyCFunction)OpusRing_commit, METH_O, "commit(upto): write the slots before upto."},
    {"leg", (PyCFunction)OpusRing_leg, METH_O, "leg(channel) -> (packets, late, dropped, end, first_at, resyncs)."},
    {"set_end", (PyCFunction)OpusRing_set_end, METH_VARARGS, "set_end(channel, end)."},
    {NULL},
};

static PyGetSetDef OpusRing_getset[] = {
    {"filled", (getter)OpusRing_get_filled, NULL, "slots filled with silence, per channel", NULL},
    {"committed", (getter)OpusRing_get_committed, NULL, "slots written", NULL},
    {NULL},
};

static PyTypeObject OpusRingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "media._rtpcore.OpusRing",
    .tp_doc = "stereo.ogg's slots (media.sinks.stereo_opus.OpusRing's twin).",
    .tp_basicsize = sizeof(OpusRing),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = OpusRing_new,
    .tp_dealloc = (destructor)OpusRing_dealloc,
    .tp_traverse = (traverseproc)OpusRing_traverse,
    .tp_clear = (inquiry)OpusRing_clear,
    .tp_methods = OpusRing_methods,
    .tp_getset = OpusRing_getset,
};

/* ----------------------------------------------------------------- Lane ------------ */
/* One call's send side while it plays something known ahead (media.lean.LeanSender):
 * a runway of Opus payloads (a pre-encoded prompt's next packets, or the silence packet
 * repeated) that send() puts on the wire one per due frame, with the header patched,
 * protected and sent as send_rtp does, the pacing measured as the track measures it,
 * and each packet placed in stereo.ogg's business leg when a recording takes it (its
 * OpusRing, as OpusLeg.write_packet places it). What Python keeps per frame (counters,
 * the source's position, the statistics) is added up here and handed over by take(),
 * once per runway. The socket is our own dup() of the pair's: a descriptor closed and
 * reused elsewhere is never written to. */

typedef struct {
    PyObject_HEAD
    int fd;
    socklen_t addrlen;
    struct sockaddr_storage addr;
    unsigned long long ctx;
    unsigned char header[64];
    Py_ssize_t hlen;
    /* the runway */
    PyObject *packets; /* a tuple of bytes */
    Py_ssize_t next, end;
    int repeat;        /* 0, or 1 + the index of the one packet sent (end - next) times */
    unsigned int seq;
    long long pts;     /* the next frame's, on the track's timeline: its RTP timestamp is origin + pts */
    unsigned int origin;
    OpusRing *ring;    /* the business leg's ring (right channel), or NULL */
    double last_sent;
    /* since take() */
    long sent, dropped, late_frames, underruns;
    long long payload_bytes, wire_bytes;
    double max_late_ms, max_interval_ms;
    uint32_t *hist;
    Py_ssize_t bins;
    double bin_s;
    unsigned long long ntp;
    PyObject *payload;   /* the last one sent (a borrowed-then-owned reference) */
    PyObject *error;     /* the ring's exception, once: the recording stops, not the audio */
    int send_errno;      /* sendto's error other than a full buffer: the lane stops */
} Lane;

static void
lane_drop_runway(Lane *l)
{
    l->next = l->end = 0;
    Py_CLEAR(l->packets);
    Py_CLEAR(l->ring);
}

static PyObject *
Lane_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    int fd;
    Py_buffer addr, header;
    unsigned long long ctx;
    Py_ssize_t bins;
    double bin_s;
    unsigned long origin;
    if (!PyArg_ParseTuple(args, "iy*Ky*ndk:Lane", &fd, &addr, &ctx, &header, &bins, &bin_s, &origin))
        return NULL;
    int bad = addr.len < 1 || (size_t)addr.len > sizeof(struct sockaddr_storage) || header.len < 12 ||
              header.len > 64 || bins < 1 || !(bin_s > 0);
    Lane *l = bad ? NULL : (Lane *)type->tp_alloc(type, 0);
    if (l != NULL) {
        l->fd = -1;
        l->hist = PyMem_Calloc((size_t)bins, sizeof(uint32_t));
        memcpy(&l->addr, addr.buf, addr.len);
        l->addrlen = (socklen_t)addr.len;
        memcpy(l->header, header.buf, header.len);
        l->hlen = header.len;
        l->ctx = ctx;
        l->bins = bins;
        l->bin_s = bin_s;
        l->origin = (unsigned int)(origin & 0xFFFFFFFFu);
    }
    PyBuffer_Release(&addr);
    PyBuffer_Release(&header);
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "Lane(fd, sockaddr, ctx, header (12..64 bytes), bins >= 1, bin_s > 0, origin)");
        return NULL;
    }
    if (l == NULL)
        return NULL;
    if (l->hist == NULL) {
        Py_DECREF(l);
        return PyErr_NoMemory();
    }
    l->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (l->fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        Py_DECREF(l);
        return NULL;
    }
    return (PyObject *)l;
}

static int
Lane_traverse(Lane *l, visitproc visit, void *arg)
{
    Py_VISIT(l->packets);
    Py_VISIT(l->ring);
    Py_VISIT(l->payload);
    Py_VISIT(l->error);
    return 0;
}

static int
Lane_clear(Lane *l)
{
    lane_drop_runway(l);
    Py_CLEAR(l->payload);
    Py_CLEAR(l->error);
    return 0;
}

static void
Lane_dealloc(Lane *l)
{
    PyObject_GC_UnTrack(l);
    Lane_clear(l);
    if (l->fd >= 0)
        close(l->fd);
    PyMem_Free(l->hist);
    Py_TYPE(l)->tp_free((PyObject *)l);
}

/* load(packets, start, count, repeat, seq, pts, last_sent, ring) -> frames loaded:
 * the runway is packets[start:start + count] (repeat: packets[start], count times),
 * the first of them sent as seq at pts (its RTP timestamp: origin + pts); last_sent: when the frame before went out (loop
 * clock). ring: the business leg's OpusRing or None; the runway stops before the first
 * packet that ring would not store as it is (the caller's path handles that one). */
static PyObject *
Lane_load(Lane *l, PyObject *args)
{
    PyObject *packets, *ring;
    Py_ssize_t start, count;
    int repeat;
    unsigned long seq;
    long long pts;
    double last_sent;
    if (!PyArg_ParseTuple(args, "O!nnpkLdO:load", &PyTuple_Type, &packets, &start, &count, &repeat, &seq, &pts,
                          &last_sent, &ring))
        return NULL;
    if (ring != Py_None && !PyObject_TypeCheck(ring, &OpusRingType)) {
        PyErr_SetString(PyExc_TypeError, "load: ring is an OpusRing or None");
        return NULL;
    }
    if (l->fd < 0) {
        PyErr_SetString(PyExc_RuntimeError, "the lane is closed");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(packets);
    if (start < 0 || count < 0 || start >= n || (!repeat && start + count > n)) {
        PyErr_SetString(PyExc_ValueError, "load: the runway is not inside packets");
        return NULL;
    }
    Py_ssize_t end = start + count;
    for (Py_ssize_t i = start; i < (repeat ? start + 1 : end); i++) {
        PyObject *p = PyTuple_GET_ITEM(packets, i);
        int usable = PyBytes_Check(p) && l->hlen + PyBytes_GET_SIZE(p) <= SRTP_MAX - SRTP_ROOM &&
                     (ring == Py_None || ring_plain((OpusRing *)ring, p));
        if (!usable) {
            end = repeat ? start : i;
            break;
        }
    }
    lane_drop_runway(l);
    if (end > start) {
        Py_INCREF(packets);
        l->packets = packets;
        if (ring != Py_None) {
            Py_INCREF(ring);
            l->ring = (OpusRing *)ring;
        }
    }
    /* repeat: next and end count frames, the packet stays at index start */
    l->repeat = repeat ? (int)(start + 1) : 0;
    l->next = repeat ? 0 : start;
    l->end = l->next + (end - start);
    l->seq = (unsigned int)(seq & 0xFFFF);
    l->pts = pts;
    l->last_sent = last_sent;
    return PyLong_FromSsize_t(end - start);
}

/* send(now, late, frames, ntp) -> frames sent (fewer: the runway ran out, or the socket
 * failed). As LeanSender sends each due frame: frame i is ``late - i * 20 ms`` late. */
static PyObject *
Lane_send(Lane *l, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "send(now, late, frames, ntp)");
        return NULL;
    }
    double now = PyFloat_AsDouble(args[0]);
    double late = PyFloat_AsDouble(args[1]);
    long frames = PyLong_AsLong(args[2]);
    unsigned long long ntp = PyLong_AsUnsignedLongLong(args[3]);
    if (PyErr_Occurred())
        return NULL;
    long done = 0;
    for (; done < frames && l->next < l->end && l->fd >= 0; done++) {
        PyObject *payload = PyTuple_GET_ITEM(l->packets, l->repeat ? l->repeat - 1 : l->next);
        double late_ms = (late - done * (FRAME / RATE)) * 1000.0;
        if (late_ms > 1.0) {
            l->late_frames++;
            if (late_ms > l->max_late_ms)
                l->max_late_ms = late_ms;
            if (late_ms > 1000.0 * FRAME / RATE)
                l->underruns++;
        }
        double interval = now - l->last_sent;
        Py_ssize_t bin = interval > 0 ? (Py_ssize_t)(interval / l->bin_s) : 0;
        l->hist[bin < l->bins && bin >= 0 ? bin : l->bins - 1]++;
        if (interval * 1000.0 > l->max_interval_ms)
            l->max_interval_ms = interval * 1000.0;
        l->last_sent = now;
        Py_ssize_t plen = PyBytes_GET_SIZE(payload);
        int length;
        unsigned long ts = (l->origin + (unsigned long long)l->pts) & 0xFFFFFFFFu;
        int sent = rtp_out(l->fd, (const struct sockaddr *)&l->addr, l->addrlen, l->ctx, l->header, l->hlen, l->seq,
                           ts, PyBytes_AS_STRING(payload), plen, &length);
        if (sent == RTP_FAILED)
            return NULL;
        if (sent == RTP_SOCKET_ERROR) {
            l->send_errno = errno; /* (the caller's path sends this frame and reports) */
            lane_drop_runway(l);
            break;
        }
        if (sent == RTP_DROPPED)
            l->dropped++;
        l->sent++;
        l->payload_bytes += plen;
        l->wire_bytes += length;
        l->ntp = ntp;
        l->seq = (l->seq + 1) & 0xFFFF;
        l->next++;
        Py_INCREF(payload);
        Py_XSETREF(l->payload, payload);
        long long pts = l->pts;
        l->pts += FRAME;
        if (l->ring != NULL && l->error == NULL) {
            /* (a commit writes the file: Python code, which may flush this lane) */
            OpusRing *ring = l->ring;
            Py_INCREF(ring);
            if (ring->write == NULL || ring_packet(ring, 1, l->payload, 1, pts, now) < 0) {
                if (!PyErr_Occurred())
                    PyErr_SetString(PyExc_RuntimeError, "OpusRing was cleared");
                PyObject *type, *value, *tb;
                PyErr_Fetch(&type, &value, &tb);
                PyErr_NormalizeException(&type, &value, &tb);
                if (tb != NULL)
                    PyException_SetTraceback(value, tb);
                Py_XDECREF(type);
                Py_XDECREF(tb);
                Py_XSETREF(l->error, value);
                Py_CLEAR(l->ring);
            }
            Py_DECREF(ring);
        }
    }
    return PyLong_FromLong(done);
}

/* take(hist) -> (sent, payload_bytes, wire_bytes, dropped, late_frames, underruns,
 * max_late_ms, max_interval_ms, last_sent, last_payload, ntp, seq, error, send_errno): what was sent since the last take(), the intervals' counts added into
 * ``hist`` (a writable buffer of ``bins`` unsigned 32-bit counts); then zeroed. */
static PyObject *
Lane_take(Lane *l, PyObject *hist_arg)
{
    Py_buffer hist;
    if (PyObject_GetBuffer(hist_arg, &hist, PyBUF_WRITABLE) < 0)
        return NULL;
    if (hist.len != l->bins * (Py_ssize_t)sizeof(uint32_t)) {
        PyBuffer_Release(&hist);
        PyErr_SetString(PyExc_ValueError, "take: hist holds bins 32-bit counts");
        return NULL;
    }
    uint32_t *out = (uint32_t *)hist.buf;
    for (Py_ssize_t i = 0; i < l->bins; i++) {
        out[i] += l->hist[i];
        l->hist[i] = 0;
    }
    PyBuffer_Release(&hist);
    PyObject *error = l->error ? l->error : Py_None;
    PyObject *result = Py_BuildValue("(lLLllldddOKIOi)", l->sent, l->payload_bytes, l->wire_bytes, l->dropped,
                                     l->late_frames, l->underruns, l->max_late_ms, l->max_interval_ms,
                                     l->last_sent, l->payload ? l->payload : Py_None, l->ntp, l->seq, error,
                                     l->send_errno);
    if (result == NULL)
        return NULL;
    l->sent = l->dropped = l->late_frames = l->underruns = 0;
    l->payload_bytes = l->wire_bytes = 0;
    l->max_late_ms = l->max_interval_ms = 0;
    l->send_errno = 0;
    Py_CLEAR(l->error);
    return result;
}

/* flush() -> frames left unsent: the runway ends here (what was sent stays to take()). */
static PyObject *
Lane_flush(Lane *l, PyObject *unused)
{
    Py_ssize_t left = l->end - l->next;
    lane_drop_runway(l);
    return PyLong_FromSsize_t(left);
}

static PyObject *
Lane_close(Lane *l, PyObject *unused)
{
    lane_drop_runway(l);
    if (l->fd >= 0) {
        close(l->fd);
        l->fd = -1;
    }
    Py_RETURN_NONE;
}

static PyObject *
Lane_get_left(Lane *l, void *closure)
{
    return PyLong_FromSsize_t(l->end - l->next);
}

static PyObject *
Lane_get_closed(Lane *l, void *closure)
{
    return PyBool_FromLong(l->fd < 0);
}

static PyMethodDef Lane_methods[] = {
    {"load", (PyCFunction)Lane_load, METH_VARARGS,
     "load(packets, start, count, repeat, seq, pts, last_sent, ring) -> frames loaded."},
    {"send", (PyCFunction)(void (*)(void))Lane_send, METH_FASTCALL, "send(now, late, frames, ntp) -> frames sent."},
    {"take", (PyCFunction)Lane_take, METH_O, "take(hist) -> what was sent since the last take() (see the source)."},
    {"flush", (PyCFunction)Lane_flush, METH_NOARGS, "flush() -> frames of the runway left unsent."},
    {"close", (PyCFunction)Lane_close, METH_NOARGS, "close(): the runway and the socket's dup go."},
    {NULL},
};

static PyGetSetDef Lane_getset[] = {
    {"left", (getter)Lane_get_left, NULL, "frames of the runway not sent yet", NULL},
    {"closed", (getter)Lane_get_closed, NULL, "whether close() ran", NULL},
    {NULL},
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "media._rtpcore.Lane",
    .tp_doc = "One call's send side over a runway of known payloads (see media.lean.LeanSender).",
    .tp_basicsize = sizeof(Lane),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = Lane_new,
    .tp_dealloc = (destructor)Lane_dealloc,
    .tp_traverse = (traverseproc)Lane_traverse,
    .tp_clear = (inquiry)Lane_clear,
    .tp_methods = Lane_methods,
    .tp_getset = Lane_getset,
};

/* ---------------------------------------------------------- PlayoutBuffer --------- */
/* The adaptive playout buffer: media.jitterbuffer.PlayoutBuffer is the reference (its
 * module docstring says what it does); this is its twin for Opus streams, with the same
 * results, and keeps its counters in C: ``stats`` copies them into the JitterStats it
 * was given (all but frames_fec, which the decoding receiver counts there itself). */

enum { JB_IDLE = 0, JB_PLAY, JB_CONCEAL, JB_STRETCH, JB_DISCARD, JB_GAP };
#define JB_SEQ_WINDOW 128
#define JB_MAX_DROPOUT 3000
#define JB_DELAY_SLACK 0.001

typedef unsigned __int128 u128;

typedef struct {
    long long pts, ext;
    PyObject *payload;
} JbEntry;

typedef struct {
    PyObject_HEAD
    /* configuration */
    long long clock_rate, frame_samples, window, warmup, capacity, far_ahead;
    double frame_s, inv_rate, initial_delay_s, min_delay_s, max_delay_s, margin_s, quantile, hysteresis_s,
        shrink_interval_s, hold_s;
    PyObject *events_hint; /* None or () -> bool */
    PyObject *stats;       /* a media.jitterbuffer.JitterStats */
    /* counters */
    long long packets_received, packets_lost, packets_late, packets_late_kept, packets_duplicate, frames_played,
        frames_concealed, frames_skipped, frames_stretched, frames_discarded, packets_overflow, playouts,
        stream_restarts;
    double target_delay_s, delay_s, jitter_s;
    int has_delay;
    /* playout */
    double target_s, start_at, last_arrival, last_shrink;
    int has_start, playing, has_played_end;
    long long next, played_end, last_seq, run;
    JbEntry *packets; /* sorted by pts, capacity + 1 */
    Py_ssize_t count;
    /* stream */
    int has_ssrc, has_bad_seq;
    long long ssrc, seq_hi, seq_first, unique, lost_before, bad_seq, ts_hi, pts_hi;
    u128 seq_mask;
    /* transit */
    double *transit, *sorted, transit_min;
    long long transit_n, transit_i, since_estimate;
} Jb;

static long long
serial_delta(long long a, long long b, int bits)
{
    long long half = 1LL << (bits - 1);
    return ((a - b + half) & ((1LL << bits) - 1)) - half;
}

static const unsigned short jb_frame_of_config[32] = {
    480, 960, 1920, 2880, 480, 960, 1920, 2880, 480, 960, 1920, 2880, /* SILK */
    480, 960, 480, 960,                                               /* Hybrid */
    120, 240, 480, 960, 120, 240, 480, 960, 120, 240, 480, 960, 120, 240, 480, 960, /* CELT */
};

/* media.jitterbuffer.opus_samples */
static long long
jb_opus_samples(PyObject *payload, long long fallback)
{
    Py_ssize_t n = PyBytes_GET_SIZE(payload);
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(payload);
    if (n == 0)
        return fallback;
    long long frame = jb_frame_of_config[p[0] >> 3];
    int code = p[0] & 3;
    if (code == 0)
        return frame;
    if (code < 3)
        return 2 * frame;
    if (n < 2 || !(p[1] & 0x3F))
        return fallback;
    return frame * (p[1] & 0x3F);
}

/* Index of pts in the sorted packets, or -(insertion point) - 1. */
static Py_ssize_t
jb_find(Jb *b, long long pts)
{
    Py_ssize_t lo = 0, hi = b->count;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (b->packets[mid].pts < pts)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo < b->count && b->packets[lo].pts == pts)
        return lo;
    return -lo - 1;
}

/* Take entry i out (its payload reference goes to the caller). */
static JbEntry
jb_take(Jb *b, Py_ssize_t i)
{
    JbEntry e = b->packets[i];
    memmove(&b->packets[i], &b->packets[i + 1], (size_t)(b->count - i - 1) * sizeof(JbEntry));
    b->count--;
    return e;
}

static void
jb_clear_packets(Jb *b)
{
    Py_ssize_t n = b->count;
    b->count = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        Py_DECREF(b->packets[i].payload);
}

static int
jb_cmp(const void *x, const void *y)
{
    double a = *(const double *)x, c = *(const double *)y;
    return a < c ? -1 : a > c;
}

static void
jb_estimate(Jb *b)
{
    b->since_estimate = 0;
    long long n = b->transit_n;
    if (!n)
        return;
    memcpy(b->sorted, b->transit, (size_t)n * sizeof(double));
    qsort(b->sorted, (size_t)n, sizeof(double), jb_cmp);
    double low = b->sorted[0];
    double jitter = b->sorted[(long long)(b->quantile * (double)(n - 1) + 0.5)] - low;
    b->transit_min = low;
    double target = jitter + b->margin_s;
    if (n < b->warmup && b->initial_delay_s > target)
        target = b->initial_delay_s;
    if (b->min_delay_s > target)
        target = b->min_delay_s;
    if (target > b->max_delay_s)
        target = b->max_delay_s;
    b->target_s = target;
    b->jitter_s = jitter;
    b->target_delay_s = target;
}

static void
jb_add_transit(Jb *b, double transit)
{
    long long i = b->transit_i;
    b->transit[i] = transit;
    b->transit_i = i + 1 < b->window ? i + 1 : 0;
    if (b->transit_n < b->window)
        b->transit_n++;
    if (transit < b->transit_min)
        b->transit_min = transit;
    if (++b->since_estimate >= 16)
        jb_estimate(b);
}

static void
jb_reset_transit(Jb *b)
{
    b->transit_n = b->transit_i = 0;
    b->transit_min = INFINITY;
    b->since_estimate = 0;
}

static void
jb_new_stream(Jb *b, long long seq, long long timestamp, long long ssrc)
{
    long long base, ext;
    if (b->has_ssrc) {
        b->stream_restarts++;
        long long lost = b->seq_hi - b->seq_first + 1 - b->unique;
        b->lost_before += lost > 0 ? lost : 0;
        base = b->pts_hi + b->frame_samples;
        if (b->count && b->packets[b->count - 1].pts + b->frame_samples > base)
            base = b->packets[b->count - 1].pts + b->frame_samples;
        if (b->playing) {
            if (b->next > base)
                base = b->next;
        } else if (b->has_played_end && b->played_end > base) {
            base = b->played_end;
        }
        ext = (((b->seq_hi >> 16) + 2) << 16) + seq;
        jb_reset_transit(b);
    } else {
        base = 0;
        ext = seq;
    }
    b->has_ssrc = 1;
    b->ssrc = ssrc;
    b->seq_hi = b->seq_first = ext;
    b->seq_mask = 1;
    b->unique = 0;
    b->has_bad_seq = 0;
    b->ts_hi = timestamp;
    b->pts_hi = base;
}

/* push(seq, timestamp, payload, now, ssrc=0) -> kept */
static PyObject *
Jb_push(Jb *b, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 4 || nargs > 5) {
        PyErr_SetString(PyExc_TypeError, "push(seq, timestamp, payload, now, ssrc=0)");
        return NULL;
    }
    long long seq = PyLong_AsLongLong(args[0]);
    long long timestamp = PyLong_AsLongLong(args[1]);
    PyObject *payload = args[2];
    double now = PyFloat_AsDouble(args[3]);
    long long ssrc = nargs == 5 ? PyLong_AsLongLong(args[4]) : 0;
    if (PyErr_Occurred())
        return NULL;
    if (!PyBytes_Check(payload)) {
        PyErr_SetString(PyExc_TypeError, "payload: bytes");
        return NULL;
    }
    b->packets_received++;
    long long pts, ext;
    if (!b->has_ssrc || ssrc != b->ssrc) {
        jb_new_stream(b, seq, timestamp, ssrc);
        pts = b->pts_hi;
        ext = b->seq_hi;
    } else {
        long long delta = serial_delta(seq, b->seq_hi, 16);
        if (delta > JB_MAX_DROPOUT || delta < -JB_MAX_DROPOUT) {
            /* RFC 3550 A.1: believe a big jump when the next packet follows it */
            if (!(b->has_bad_seq && b->bad_seq == seq)) {
                b->has_bad_seq = 1;
                b->bad_seq = (seq + 1) & 0xFFFF;
                b->packets_late++;
                Py_RETURN_FALSE;
            }
            b->has_bad_seq = 0;
            jb_new_stream(b, seq, timestamp, ssrc);
            pts = b->pts_hi;
            ext = b->seq_hi;
        } else if (delta > 0) {
            ext = b->seq_hi = b->seq_hi + delta;
            b->seq_mask = delta >= JB_SEQ_WINDOW ? 1 : ((b->seq_mask << delta) | 1);
            long long dts = serial_delta(timestamp, b->ts_hi, 32);
            b->ts_hi = timestamp;
            pts = b->pts_hi = b->pts_hi + dts;
        } else {
            long long back = -delta;
            if (back >= JB_SEQ_WINDOW) {
                b->packets_late++;
                Py_RETURN_FALSE;
            }
            if ((b->seq_mask >> back) & 1) {
                b->packets_duplicate++;
                Py_RETURN_FALSE;
            }
            b->seq_mask |= (u128)1 << back;
            ext = b->seq_hi - back;
            pts = b->pts_hi + serial_delta(timestamp, b->ts_hi, 32);
        }
        b->has_bad_seq = 0;
    }
    b->unique++;
    long long lost = b->seq_hi - b->seq_first + 1 - b->unique;
    b->packets_lost = b->lost_before + (lost > 0 ? lost : 0);
    b->last_arrival = now;
    double transit = now - (double)pts * b->inv_rate;
    if (b->playing) {
        if (pts < b->next) {
            if (!b->has_played_end || pts >= b->played_end) {
                b->packets_late_kept++;
                b->run = floor_div(pts - b->played_end, b->frame_samples);
                b->next = pts;
            } else {
                b->packets_late++;
                jb_add_transit(b, transit);
                jb_estimate(b);
                Py_RETURN_FALSE;
            }
        } else if (pts - b->next > b->far_ahead) {
            b->packets_overflow += b->count;
            jb_clear_packets(b);
            b->playing = 0;
            jb_reset_transit(b);
        }
    } else if (b->has_played_end && pts < b->played_end) {
        b->packets_late++;
        Py_RETURN_FALSE;
    } else if (!b->has_start && fabs(transit - b->transit_min) > b->max_delay_s) {
        jb_reset_transit(b);
    }
    jb_add_transit(b, transit);
    Py_ssize_t at = jb_find(b, pts);
    if (at >= 0) {
        b->packets_duplicate++;
        Py_RETURN_FALSE;
    }
    at = -at - 1;
    memmove(&b->packets[at + 1], &b->packets[at], (size_t)(b->count - at) * sizeof(JbEntry));
    b->packets[at].pts = pts;
    b->packets[at].ext = ext;
    Py_INCREF(payload);
    b->packets[at].payload = payload;
    b->count++;
    if (b->count > b->capacity) {
        JbEntry oldest = jb_take(b, 0);
        Py_DECREF(oldest.payload);
        b->packets_overflow++;
    }
    if (!b->playing && !b->has_start) {
        b->has_start = 1;
        b->start_at = now + b->target_s;
    }
    Py_RETURN_TRUE;
}

static PyObject *jb_idle = NULL; /* (IDLE, None, None) */

static PyObject *
jb_result(int kind, PyObject *payload, int has_pts, long long pts)
{
    PyObject *p = has_pts ? PyLong_FromLongLong(pts) : Py_NewRef(Py_None);
    if (p == NULL)
        return NULL;
    return Py_BuildValue("(iON)", kind, payload ? payload : Py_None, p);
}

/* _play: the entry (its payload reference is the caller's) at pts. */
static PyObject *
jb_play(Jb *b, JbEntry e, long long pts, double delay, double now)
{
    b->last_seq = e.ext;
    long long following = pts + jb_opus_samples(e.payload, b->frame_samples);
    b->next = b->played_end = following;
    b->has_played_end = 1;
    b->run = 0;
    int kind = JB_PLAY;
    if (delay >= b->target_s + b->frame_s + b->hysteresis_s && now - b->last_shrink >= b->shrink_interval_s
        && jb_find(b, following) >= 0) {
        b->last_shrink = now;
        b->frames_discarded++;
        kind = JB_DISCARD;
    } else {
        b->frames_played++;
    }
    PyObject *out = jb_result(kind, e.payload, 1, pts);
    Py_DECREF(e.payload);
    return out;
}

/* pop(now) -> (kind, payload, pts) */
static PyObject *
Jb_pop(Jb *b, PyObject *arg)
{
    double now = PyFloat_AsDouble(arg);
    if (now == -1.0 && PyErr_Occurred())
        return NULL;
    if (!b->playing) {
        if (!b->has_start)
            return Py_NewRef(jb_idle);
        if (!b->count) {
            b->has_start = 0;
            return Py_NewRef(jb_idle);
        }
        if (now < b->start_at - 1e-6)
            return Py_NewRef(jb_idle);
        b->has_start = 0;
        b->playing = 1;
        b->next = b->played_end = b->packets[0].pts;
        b->has_played_end = 1;
        b->last_seq = b->packets[0].ext - 1;
        b->run = 0;
        b->last_shrink = now;
        b->playouts++;
    }
    long long nxt = b->next;
    double delay = now - (double)nxt * b->inv_rate - b->transit_min;
    b->delay_s = delay;
    b->has_delay = 1;
    Py_ssize_t at = jb_find(b, nxt);
    if (at >= 0)
        return jb_play(b, jb_take(b, at), nxt, delay, now);
    long long frame = b->frame_samples;
    if (b->count) {
        long long head = b->packets[0].pts;
        if (head < nxt + frame)
            return jb_play(b, jb_take(b, 0), head, delay, now);
        if (b->packets[0].ext - b->last_seq - 1 <= b->run) {
            b->next = nxt + frame;
            b->frames_skipped++;
            return jb_result(JB_GAP, NULL, 1, nxt);
        }
    } else if (now - b->last_arrival > b->hold_s) {
        b->playing = 0;
        b->has_delay = 0;
        return Py_NewRef(jb_idle);
    } else if (b->events_hint != Py_None) {
        PyObject *hint = PyObject_CallNoArgs(b->events_hint);
        if (hint == NULL)
            return NULL;
        int yes = PyObject_IsTrue(hint);
        Py_DECREF(hint);
        if (yes < 0)
            return NULL;
        if (yes) {
            b->next = nxt + frame;
            b->frames_skipped++;
            return jb_result(JB_GAP, NULL, 1, nxt);
        }
    }
    b->frames_concealed++;
    if (delay < b->target_s - JB_DELAY_SLACK) {
        b->frames_stretched++;
        return jb_result(JB_STRETCH, NULL, 0, 0);
    }
    b->next = nxt + frame;
    b->run++;
    return jb_result(JB_CONCEAL, NULL, 1, nxt);
}

static PyObject *
Jb_peek(Jb *b, PyObject *arg)
{
    long long pts = PyLong_AsLongLong(arg);
    if (pts == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t at = jb_find(b, pts);
    return Py_NewRef(at >= 0 ? b->packets[at].payload : Py_None);
}

/* drain() -> [(kind, payload, pts)]: everything buffered, as the ticks would play it. */
static PyObject *
Jb_drain(Jb *b, PyObject *unused)
{
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    if (b->count) {
        if (!b->playing) {
            b->next = b->packets[0].pts;
            b->last_seq = b->packets[0].ext - 1;
            b->run = 0;
        }
        long long nxt = b->next, frame = b->frame_samples;
        while (b->count) {
            PyObject *item;
            Py_ssize_t at = jb_find(b, nxt);
            if (at < 0) {
                long long head = b->packets[0].pts;
                if (head < nxt + frame) {
                    nxt = head;
                    continue;
                }
                if (b->packets[0].ext - b->last_seq - 1 <= b->run) {
                    item = jb_result(JB_GAP, NULL, 1, nxt);
                    b->frames_skipped++;
                } else {
                    item = jb_result(JB_CONCEAL, NULL, 1, nxt);
                    b->frames_concealed++;
                    b->run++;
                }
                nxt += frame;
            } else {
                JbEntry e = jb_take(b, at);
                b->last_seq = e.ext;
                item = jb_result(JB_PLAY, e.payload, 1, nxt);
                b->frames_played++;
                nxt += jb_opus_samples(e.payload, frame);
                b->played_end = nxt;
                b->has_played_end = 1;
                b->run = 0;
                Py_DECREF(e.payload);
            }
            if (item == NULL || PyList_Append(out, item) < 0) {
                Py_XDECREF(item);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(item);
        }
        b->next = nxt;
    }
    b->playing = 0;
    b->has_start = 0;
    return out;
}

static PyObject *
Jb_delay(Jb *b, PyObject *arg)
{
    double now = PyFloat_AsDouble(arg);
    if (now == -1.0 && PyErr_Occurred())
        return NULL;
    if (!b->playing || b->transit_min == INFINITY)
        Py_RETURN_NONE;
    return PyFloat_FromDouble(now - (double)b->next * b->inv_rate - b->transit_min);
}

static Py_ssize_t
Jb_len(Jb *b)
{
    return b->count;
}

static int
jb_set(PyObject *stats, const char *name, PyObject *value)
{
    if (value == NULL)
        return -1;
    int r = PyObject_SetAttrString(stats, name, value);
    Py_DECREF(value);
    return r;
}

/* stats: the JitterStats given, brought up to date. */
static PyObject *
Jb_get_stats(Jb *b, void *closure)
{
    PyObject *s = b->stats;
    struct {
        const char *name;
        long long value;
    } counters[] = {
        {"packets_received", b->packets_received}, {"packets_lost", b->packets_lost},
        {"packets_late", b->packets_late}, {"packets_late_kept", b->packets_late_kept},
        {"packets_duplicate", b->packets_duplicate}, {"frames_played", b->frames_played},
        {"frames_concealed", b->frames_concealed}, {"frames_skipped", b->frames_skipped},
        {"frames_stretched", b->frames_stretched}, {"frames_discarded", b->frames_discarded},
        {"packets_overflow", b->packets_overflow}, {"playouts", b->playouts},
        {"stream_restarts", b->stream_restarts},
    };
    for (size_t i = 0; i < sizeof counters / sizeof counters[0]; i++)
        if (jb_set(s, counters[i].name, PyLong_FromLongLong(counters[i].value)) < 0)
            return NULL;
    if (jb_set(s, "target_delay_s", PyFloat_FromDouble(b->target_delay_s)) < 0
        || jb_set(s, "delay_s", b->has_delay ? PyFloat_FromDouble(b->delay_s) : Py_NewRef(Py_None)) < 0
        || jb_set(s, "jitter_s", PyFloat_FromDouble(b->jitter_s)) < 0)
        return NULL;
    return Py_NewRef(s);
}

static PyObject *
Jb_get_start_at(Jb *b, void *closure)
{
    return b->has_start ? PyFloat_FromDouble(b->start_at) : Py_NewRef(Py_None);
}

static PyObject *
Jb_get_next_pts(Jb *b, void *closure)
{
    return b->playing ? PyLong_FromLongLong(b->next) : Py_NewRef(Py_None);
}

static PyObject *
Jb_get_playing(Jb *b, void *closure)
{
    return PyBool_FromLong(b->playing);
}

static PyObject *
Jb_get_events_hint(Jb *b, void *closure)
{
    return Py_NewRef(b->events_hint);
}

static int
Jb_set_events_hint(Jb *b, PyObject *value, void *closure)
{
    if (value == NULL || (value != Py_None && !PyCallable_Check(value))) {
        PyErr_SetString(PyExc_TypeError, "events_hint: None or a callable");
        return -1;
    }
    Py_SETREF(b->events_hint, Py_NewRef(value));
    return 0;
}

static PyObject *
Jb_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"stats", "clock_rate", "frame_samples", "initial_delay_s", "min_delay_s",
                            "max_delay_s", "margin_s", "quantile", "window", "warmup", "hysteresis_s",
                            "shrink_interval_s", "hold_s", "capacity", NULL};
    PyObject *stats;
    long long clock_rate = 48000, frame_samples = 960, window = 200, warmup = 50, capacity = 100;
    double initial = 0.06, min_delay = 0.02, max_delay = 0.2, margin = 0.005, quantile = 0.97, hysteresis = 0.01,
           shrink = 0.25, hold = 0.2;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|$LLdddddLLdddL:PlayoutBuffer", names, &stats, &clock_rate,
                                     &frame_samples, &initial, &min_delay, &max_delay, &margin, &quantile, &window,
                                     &warmup, &hysteresis, &shrink, &hold, &capacity))
        return NULL;
    if (!(0 < min_delay && min_delay <= initial && initial <= max_delay)) {
        PyErr_SetString(PyExc_ValueError, "need 0 < min_delay_s <= initial_delay_s <= max_delay_s");
        return NULL;
    }
    if (!(0.5 <= quantile && quantile < 1) || window < 10 || !(1 <= warmup && warmup <= window)) {
        PyErr_SetString(PyExc_ValueError, "bad quantile / window / warmup");
        return NULL;
    }
    if (clock_rate <= 0 || frame_samples <= 0 || capacity < 1 || capacity > 100000 || window > 1000000) {
        PyErr_SetString(PyExc_ValueError, "bad clock_rate / frame_samples / capacity / window");
        return NULL;
    }
    Jb *b = (Jb *)type->tp_alloc(type, 0);
    if (b == NULL)
        return NULL;
    b->clock_rate = clock_rate;
    b->frame_samples = frame_samples;
    b->frame_s = (double)frame_samples / (double)clock_rate;
    b->inv_rate = 1.0 / (double)clock_rate;
    b->initial_delay_s = initial;
    b->min_delay_s = min_delay;
    b->max_delay_s = max_delay;
    b->margin_s = margin;
    b->quantile = quantile;
    b->window = window;
    b->warmup = warmup;
    b->hysteresis_s = hysteresis;
    b->shrink_interval_s = shrink;
    b->hold_s = hold;
    b->capacity = capacity;
    b->far_ahead = (long long)nearbyint((2 * max_delay + 0.1) * (double)clock_rate);
    b->events_hint = Py_NewRef(Py_None);
    b->stats = Py_NewRef(stats);
    b->target_delay_s = b->target_s = initial;
    b->last_arrival = b->last_shrink = -INFINITY;
    b->transit_min = INFINITY;
    b->packets = PyMem_Calloc((size_t)capacity + 1, sizeof(JbEntry));
    b->transit = PyMem_Calloc((size_t)window, sizeof(double));
    b->sorted = PyMem_Calloc((size_t)window, sizeof(double));
    if (b->packets == NULL || b->transit == NULL || b->sorted == NULL) {
        Py_DECREF(b);
        return PyErr_NoMemory();
    }
    return (PyObject *)b;
}

static int
Jb_traverse(Jb *b, visitproc visit, void *arg)
{
    Py_VISIT(b->events_hint);
    Py_VISIT(b->stats);
    for (Py_ssize_t i = 0; i < b->count; i++)
        Py_VISIT(b->packets[i].payload);
    return 0;
}

static int
Jb_clear(Jb *b)
{
    Py_CLEAR(b->events_hint);
    b->events_hint = Py_NewRef(Py_None); /* (always callable-or-None) */
    jb_clear_packets(b);
    return 0;
}

static void
Jb_dealloc(Jb *b)
{
    PyObject_GC_UnTrack(b);
    Py_CLEAR(b->events_hint);
    Py_CLEAR(b->stats);
    if (b->packets != NULL)
        jb_clear_packets(b);
    PyMem_Free(b->packets);
    PyMem_Free(b->transit);
    PyMem_Free(b->sorted);
    Py_TYPE(b)->tp_free((PyObject *)b);
}

static PyMethodDef Jb_methods[] = {
    {"push", (PyCFunction)(void (*)(void))Jb_push, METH_FASTCALL,
     "push(seq, timestamp, payload, now, ssrc=0) -> whether it was kept."},
    {"pop", (PyCFunction)Jb_pop, METH_O, "pop(now) -> (kind, payload, pts)."},
    {"peek", (PyCFunction)Jb_peek, METH_O, "peek(pts) -> the payload buffered there, or None."},
    {"drain", (PyCFunction)Jb_drain, METH_NOARGS, "drain() -> everything buffered, as the ticks would play it."},
    {"delay", (PyCFunction)Jb_delay, METH_O, "delay(now) -> the delay beyond the fastest packet, or None."},
    {NULL},
};

static PyMemberDef Jb_members[] = {
    {"clock_rate", T_LONGLONG, offsetof(Jb, clock_rate), READONLY, NULL},
    {"frame_samples", T_LONGLONG, offsetof(Jb, frame_samples), READONLY, NULL},
    {"frame_s", T_DOUBLE, offsetof(Jb, frame_s), READONLY, NULL},
    {"initial_delay_s", T_DOUBLE, offsetof(Jb, initial_delay_s), READONLY, NULL},
    {"min_delay_s", T_DOUBLE, offsetof(Jb, min_delay_s), 0, NULL},
    {"max_delay_s", T_DOUBLE, offsetof(Jb, max_delay_s), READONLY, NULL},
    {"margin_s", T_DOUBLE, offsetof(Jb, margin_s), READONLY, NULL},
    {"quantile", T_DOUBLE, offsetof(Jb, quantile), READONLY, NULL},
    {"window", T_LONGLONG, offsetof(Jb, window), READONLY, NULL},
    {"warmup", T_LONGLONG, offsetof(Jb, warmup), READONLY, NULL},
    {"hysteresis_s", T_DOUBLE, offsetof(Jb, hysteresis_s), READONLY, NULL},
    {"shrink_interval_s", T_DOUBLE, offsetof(Jb, shrink_interval_s), READONLY, NULL},
    {"hold_s", T_DOUBLE, offsetof(Jb, hold_s), READONLY, NULL},
    {"capacity", T_LONGLONG, offsetof(Jb, capacity), READONLY, NULL},
    {"target_s", T_DOUBLE, offsetof(Jb, target_s), 0, NULL},
    {NULL},
};

static PyGetSetDef Jb_getset[] = {
    {"stats", (getter)Jb_get_stats, NULL, "the counters (a JitterStats)", NULL},
    {"start_at", (getter)Jb_get_start_at, NULL, "when playout should start, or None", NULL},
    {"next_pts", (getter)Jb_get_next_pts, NULL, "the next slot's stream position (None unless playing)", NULL},
    {"playing", (getter)Jb_get_playing, NULL, NULL, NULL},
    {"events_hint", (getter)Jb_get_events_hint, (setter)Jb_set_events_hint,
     "() -> bool: telephone-events arrive instead of audio now", NULL},
    {NULL},
};

static PySequenceMethods Jb_as_sequence = {
    .sq_length = (lenfunc)Jb_len,
};

static PyTypeObject JbType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "media._rtpcore.PlayoutBuffer",
    .tp_doc = "The adaptive playout buffer for Opus (media.jitterbuffer.PlayoutBuffer's twin).",
    .tp_basicsize = sizeof(Jb),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = Jb_new,
    .tp_dealloc = (destructor)Jb_dealloc,
    .tp_traverse = (traverseproc)Jb_traverse,
    .tp_clear = (inquiry)Jb_clear,
    .tp_methods = Jb_methods,
    .tp_members = Jb_members,
    .tp_getset = Jb_getset,
    .tp_as_sequence = &Jb_as_sequence,
};

/* ---------------------------------------------------------------- module ---------- */

static PyMethodDef methods[] = {
    {"bind_srtp", bind_srtp, METH_VARARGS,
     "bind_srtp(protect, unprotect, error): libsrtp's srtp_protect/srtp_unprotect addresses and the exception to raise."},
    {"srtp", srtp, METH_VARARGS, "srtp(ctx, protect, data) -> bytes: protect (or unprotect) one packet."},
    {"sockaddr", sockaddr_of, METH_O, "sockaddr((host, port[, flowinfo, scope_id])) -> the C struct, for send_rtp."},
    {"send_rtp", (PyCFunction)(void (*)(void))send_rtp, METH_FASTCALL,
     "send_rtp(fd, sockaddr, ctx, header, seq, timestamp, payload) -> length on the wire (negative: dropped, buffer full)."},
    {"drain", drain, METH_VARARGS,
     "drain(epfd, rounds, offset, now[, routes]) -> [(fd, data, addr, at)]; a socket's error as (fd, None, "
     "errno, now); with routes, (that list, [(owner, plain, view, n, at)])."},
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
    if (PyType_Ready(&OpusRingType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&OpusRingType);
    if (PyModule_AddObject(m, "OpusRing", (PyObject *)&OpusRingType) < 0) {
        Py_DECREF(&OpusRingType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyType_Ready(&LaneType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&LaneType);
    if (PyModule_AddObject(m, "Lane", (PyObject *)&LaneType) < 0) {
        Py_DECREF(&LaneType);
        Py_DECREF(m);
        return NULL;
    }
    jb_idle = Py_BuildValue("(iOO)", JB_IDLE, Py_None, Py_None);
    if (jb_idle == NULL || PyType_Ready(&JbType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&JbType);
    if (PyModule_AddObject(m, "PlayoutBuffer", (PyObject *)&JbType) < 0) {
        Py_DECREF(&JbType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "MAX_DATAGRAM", MAX_DATAGRAM);
    return m;
}
