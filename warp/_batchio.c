/* warp._batchio: many UDP datagrams per system call (Linux recvmmsg/sendmmsg).
 *
 * Thin wrappers with the semantics of warp/paths/batch_io.py's pure-Python fallback, which
 * the tests hold them to byte for byte. Both calls pass MSG_DONTWAIT and never block, so
 * they keep the GIL (a released GIL costs more than the call) and may share one receive
 * buffer for the whole process.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define MAX_BATCH 256
#define MAX_SIZE (1 << 16)

/* One batch's worth of message headers and addresses; the GIL serialises their users. */
static struct mmsghdr msgs[MAX_BATCH];
static struct iovec iovs[MAX_BATCH];
static struct sockaddr_storage addrs[MAX_BATCH];
static Py_buffer bufs[MAX_BATCH];
static char *rx_buffer;
static size_t rx_capacity;

/* OSError (the subclass for errno, as socket methods raise) without setting it. */
static PyObject *
os_error(int code)
{
    return PyObject_CallFunction(PyExc_OSError, "is", code, strerror(code));
}

/* (host, port) as socket.recvfrom gives it, IPv6 shortened to two fields as uplinks do. */
static PyObject *
make_address(const struct sockaddr_storage *ss)
{
    char host[NI_MAXHOST];
    int port;
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)ss;
        if (!inet_ntop(AF_INET, &sin->sin_addr, host, sizeof host))
            return PyErr_SetFromErrno(PyExc_OSError);
        port = ntohs(sin->sin_port);
    }
    else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)ss;
        if (sin6->sin6_scope_id) {
            /* as CPython: getnameinfo appends "%<interface>" to a scoped address */
            int rc = getnameinfo((const struct sockaddr *)sin6, sizeof *sin6, host,
                                 sizeof host, NULL, 0, NI_NUMERICHOST);
            if (rc)
                return PyErr_Format(PyExc_OSError, "getnameinfo: %s", gai_strerror(rc));
        }
        else if (!inet_ntop(AF_INET6, &sin6->sin6_addr, host, sizeof host))
            return PyErr_SetFromErrno(PyExc_OSError);
        port = ntohs(sin6->sin6_port);
    }
    else {
        host[0] = '\0';
        port = 0;
    }
    return Py_BuildValue("(si)", host, port);
}

/* A (host, port) or (host, port, flowinfo, scope_id) tuple with a numeric host into `ss`.
 * Returns the sockaddr length, or 0 with an exception set. */
static socklen_t
parse_address(PyObject *address, struct sockaddr_storage *ss)
{
    const char *host;
    int port;
    unsigned int flowinfo = 0, scope_id = 0;
    if (!PyTuple_Check(address)) {
        PyErr_SetString(PyExc_TypeError, "address must be a tuple (host, port)");
        return 0;
    }
    if (!PyArg_ParseTuple(address, "si|II:address", &host, &port, &flowinfo, &scope_id))
        return 0;
    if (port < 0 || port > 0xffff) {
        PyErr_SetString(PyExc_OverflowError, "port must be 0-65535.");
        return 0;
    }
    memset(ss, 0, sizeof *ss);
    if (!strchr(host, ':')) {
        struct sockaddr_in *sin = (struct sockaddr_in *)ss;
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, host, &sin->sin_addr) != 1)
            goto bad_host;
        return sizeof *sin;
    }
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;
    char text[INET6_ADDRSTRLEN];
    const char *percent = strchr(host, '%');
    size_t length = percent ? (size_t)(percent - host) : strlen(host);
    if (length >= sizeof text)
        goto bad_host;
    memcpy(text, host, length);
    text[length] = '\0';
    sin6->sin6_family = AF_INET6;
    sin6->sin6_port = htons((uint16_t)port);
    sin6->sin6_flowinfo = htonl(flowinfo);
    sin6->sin6_scope_id = scope_id;
    if (inet_pton(AF_INET6, text, &sin6->sin6_addr) != 1)
        goto bad_host;
    if (percent) {
        char *end;
        unsigned long index = strtoul(percent + 1, &end, 10);
        if (*end != '\0' || end == percent + 1)
            index = if_nametoindex(percent + 1);
        if (!index)
            goto bad_host;
        sin6->sin6_scope_id = (uint32_t)index;
    }
    return sizeof *sin6;
bad_host:
    PyErr_Format(PyExc_ValueError, "not a numeric IP address: %.100s", host);
    return 0;
}

PyDoc_STRVAR(recv_many_doc,
"recv_many(fd, max_count, max_size) -> (datagrams, truncated, error)\n\n"
"Up to max_count datagrams waiting on the UDP socket fd, in one recvmmsg call:\n"
"datagrams is a list of (bytes, (host, port)); truncated counts those longer than\n"
"max_size (dropped); error is the OSError of a failed call (nothing received), else\n"
"None. Nothing waiting (EAGAIN) is ([], 0, None).");

static PyObject *
recv_many(PyObject *module, PyObject *args)
{
    int fd, max_count, max_size;
    if (!PyArg_ParseTuple(args, "iii:recv_many", &fd, &max_count, &max_size))
        return NULL;
    if (max_count < 1 || max_count > MAX_BATCH)
        return PyErr_Format(PyExc_ValueError, "max_count must be 1-%d", MAX_BATCH);
    if (max_size < 1 || max_size > MAX_SIZE)
        return PyErr_Format(PyExc_ValueError, "max_size must be 1-%d", MAX_SIZE);
    size_t need = (size_t)max_count * (size_t)max_size;
    if (need > rx_capacity) {
        /* grown only: pages the kernel never writes stay untouched (no resident memory) */
        char *grown = realloc(rx_buffer, need);
        if (!grown)
            return PyErr_NoMemory();
        rx_buffer = grown;
        rx_capacity = need;
    }
    for (int i = 0; i < max_count; i++) {
        iovs[i].iov_base = rx_buffer + (size_t)i * (size_t)max_size;
        iovs[i].iov_len = (size_t)max_size;
        memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
        msgs[i].msg_hdr.msg_name = &addrs[i];
        msgs[i].msg_hdr.msg_namelen = sizeof addrs[i];
        msgs[i].msg_hdr.msg_iov = &iovs[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_len = 0;
    }
    int received;
    do {
        received = recvmmsg(fd, msgs, (unsigned int)max_count, MSG_DONTWAIT, NULL);
    } while (received < 0 && errno == EINTR);
    PyObject *datagrams = PyList_New(0);
    if (!datagrams)
        return NULL;
    if (received < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return Py_BuildValue("(NiO)", datagrams, 0, Py_None);
        PyObject *error = os_error(errno);
        if (!error) {
            Py_DECREF(datagrams);
            return NULL;
        }
        return Py_BuildValue("(NiN)", datagrams, 0, error);
    }
    int truncated = 0;
    PyObject *address = NULL; /* shared by consecutive datagrams from one source */
    const struct sockaddr_storage *last = NULL;
    socklen_t last_length = 0;
    for (int i = 0; i < received; i++) {
        struct msghdr *hdr = &msgs[i].msg_hdr;
        if (hdr->msg_flags & MSG_TRUNC) {
            truncated++;
            continue;
        }
        if (!address || hdr->msg_namelen != last_length || memcmp(last, &addrs[i], last_length)) {
            Py_XDECREF(address);
            address = make_address(&addrs[i]);
            if (!address)
                goto fail;
            last = &addrs[i];
            last_length = hdr->msg_namelen;
        }
        PyObject *data = PyBytes_FromStringAndSize(iovs[i].iov_base, msgs[i].msg_len);
        if (!data)
            goto fail;
        PyObject *item = PyTuple_Pack(2, data, address);
        Py_DECREF(data);
        if (!item)
            goto fail;
        int rc = PyList_Append(datagrams, item);
        Py_DECREF(item);
        if (rc < 0)
            goto fail;
    }
    Py_XDECREF(address);
    return Py_BuildValue("(NiO)", datagrams, truncated, Py_None);
fail:
    Py_XDECREF(address);
    Py_DECREF(datagrams);
    return NULL;
}

PyDoc_STRVAR(send_many_doc,
"send_many(fd, messages, start) -> int\n\n"
"Send messages[start:], a sequence of (data, (host, port)), from the UDP socket fd,\n"
"each to its own address, with one sendmmsg call (at most 256). Returns how many went out\n"
"(from start, in order). If the first of them fails, raises its error (OSError, or\n"
"ValueError/TypeError/OverflowError for a bad address); a later failure ends the batch\n"
"before it, so that the next call, from there, reports it.");

static PyObject *
send_many(PyObject *module, PyObject *args)
{
    int fd;
    PyObject *messages;
    Py_ssize_t start;
    if (!PyArg_ParseTuple(args, "iOn:send_many", &fd, &messages, &start))
        return NULL;
    PyObject *fast = PySequence_Fast(messages, "messages must be a sequence");
    if (!fast)
        return NULL;
    Py_ssize_t total = PySequence_Fast_GET_SIZE(fast);
    if (start < 0 || start > total) {
        Py_DECREF(fast);
        return PyErr_Format(PyExc_IndexError, "start out of range");
    }
    Py_ssize_t count = total - start;
    if (count > MAX_BATCH)
        count = MAX_BATCH;
    PyObject **items = PySequence_Fast_ITEMS(fast) + start;
    Py_ssize_t ready = 0;
    for (; ready < count; ready++) {
        PyObject *item = items[ready];
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            PyErr_SetString(PyExc_TypeError, "each message must be a (data, address) tuple");
            break;
        }
        socklen_t length = parse_address(PyTuple_GET_ITEM(item, 1), &addrs[ready]);
        if (!length)
            break;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(item, 0), &bufs[ready], PyBUF_SIMPLE) < 0)
            break;
        iovs[ready].iov_base = bufs[ready].buf;
        iovs[ready].iov_len = (size_t)bufs[ready].len;
        memset(&msgs[ready].msg_hdr, 0, sizeof msgs[ready].msg_hdr);
        msgs[ready].msg_hdr.msg_name = &addrs[ready];
        msgs[ready].msg_hdr.msg_namelen = length;
        msgs[ready].msg_hdr.msg_iov = &iovs[ready];
        msgs[ready].msg_hdr.msg_iovlen = 1;
    }
    PyObject *result = NULL;
    if (ready == 0 && count > 0) {
        /* the first message itself is bad: its error, as sendto would raise it */
        Py_DECREF(fast);
        return NULL;
    }
    PyErr_Clear(); /* a bad message later on: sent up to it; the next call reports it */
    int sent = 0;
    if (ready > 0) {
        do {
            sent = sendmmsg(fd, msgs, (unsigned int)ready, MSG_DONTWAIT);
        } while (sent < 0 && errno == EINTR);
    }
    if (sent < 0)
        PyErr_SetFromErrno(PyExc_OSError);
    else
        result = PyLong_FromLong(sent);
    for (Py_ssize_t i = 0; i < ready; i++)
        PyBuffer_Release(&bufs[i]);
    Py_DECREF(fast);
    return result;
}

static PyMethodDef methods[] = {
    {"recv_many", recv_many, METH_VARARGS, recv_many_doc},
    {"send_many", send_many, METH_VARARGS, send_many_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "warp._batchio",
    "recvmmsg/sendmmsg for UDP sockets (see warp/paths/batch_io.py).",
    -1,
    methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__batchio(void)
{
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    if (PyModule_AddIntConstant(m, "MAX_BATCH", MAX_BATCH) < 0 ||
        PyModule_AddIntConstant(m, "MAX_SIZE", MAX_SIZE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
