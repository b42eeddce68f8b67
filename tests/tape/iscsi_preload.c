/*
 * Test code for vmdr's tape tests: an LD_PRELOAD library that makes a regular file
 * whose content is "iscsi://HOST[:PORT]/IQN/LUN" behave like a Linux SCSI device, so the
 * real mtx, mt (mt-st), sg3_utils and Python's fcntl.ioctl(SG_IO) reach tgt's emulated
 * tape library over iSCSI on loopback. This machine's kernel has no SCSI support.
 *
 *   ioctl(SG_IO)            -> one libiscsi SCSI command; status, sense, residual back
 *   ioctl(MTIOCTOP)         -> REWIND, SPACE, WRITE FILEMARKS, LOAD/UNLOAD (like st)
 *   ioctl(MTIOCGET/MTIOCPOS)-> TEST UNIT READY + MODE SENSE, and our position counter
 *   read()/write()          -> READ(6)/WRITE(6), variable block mode
 *   close() after a write   -> a filemark, as st writes one
 * The position (file, block) is kept in "<path>.pos" between processes.
 *
 * It is not the kernel st driver and not hardware. Built by tests/tape/tgt.py:
 *   gcc -shared -fPIC -O2 -o libvmdr_iscsi_preload.so iscsi_preload.c -liscsi -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mtio.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>
#include <scsi/sg.h>
#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>

#define MAXFD 4096
#ifndef MTWEOFI
#define MTWEOFI 35
#endif

struct dev {
    struct iscsi_context *iscsi;
    int lun;
    int tape;       /* peripheral type 1 */
    int wrote;      /* data written since the last filemark */
    int eom_next;   /* early warning seen: the next write reports ENOSPC once */
    long fileno, blkno;
    int refs;       /* file descriptors sharing it (dup, dup2: dd moves fd 3 to 1) */
    char pos_path[4200];
};

static struct dev *devs[MAXFD];

static int (*real_open)(const char *, int, ...);
static int (*real_close)(int);
static ssize_t (*real_read)(int, void *, size_t);
static ssize_t (*real_write)(int, const void *, size_t);
static int (*real_ioctl)(int, unsigned long, ...);

static void init(void)
{
    if (real_open)
        return;
    real_open = dlsym(RTLD_NEXT, "open");
    real_close = dlsym(RTLD_NEXT, "close");
    real_read = dlsym(RTLD_NEXT, "read");
    real_write = dlsym(RTLD_NEXT, "write");
    real_ioctl = dlsym(RTLD_NEXT, "ioctl");
}

static struct dev *dev_of(int fd)
{
    return (fd >= 0 && fd < MAXFD) ? devs[fd] : NULL;
}

/* ----------------------------------------------------------------- SCSI */
struct result {
    int status;
    unsigned char sense[64];
    int sense_len;
    size_t residual;
    int transport_error;
};

static int sense_key(const struct result *r) { return r->sense_len > 2 ? (r->sense[2] & 0x0f) : 0; }
static int sense_fm(const struct result *r) { return r->sense_len > 2 && (r->sense[2] & 0x80); }
static int sense_eom(const struct result *r) { return r->sense_len > 2 && (r->sense[2] & 0x40); }
static int sense_ili(const struct result *r) { return r->sense_len > 2 && (r->sense[2] & 0x20); }
static int32_t sense_info(const struct result *r)
{
    if (r->sense_len < 7)
        return 0;
    return (int32_t)((uint32_t)r->sense[3] << 24 | (uint32_t)r->sense[4] << 16 |
                     (uint32_t)r->sense[5] << 8 | r->sense[6]);
}

static void command(struct dev *d, const unsigned char *cdb, int cdb_len, int dir,
                    void *buf, size_t len, struct result *r)
{
    struct scsi_task *t;
    struct iscsi_data out;
    struct scsi_iovec iov;

    memset(r, 0, sizeof(*r));
    t = scsi_create_task(cdb_len, (unsigned char *)cdb, dir, (int)len);
    if (!t) {
        r->transport_error = 1;
        return;
    }
    if (dir == SCSI_XFER_READ && len) {
        iov.iov_base = buf;
        iov.iov_len = len;
        scsi_task_set_iov_in(t, &iov, 1);
    }
    out.data = buf;
    out.size = (size_t)len;
    if (iscsi_scsi_command_sync(d->iscsi, d->lun, t,
                                dir == SCSI_XFER_WRITE ? &out : NULL) == NULL) {
        r->transport_error = 1;
        scsi_free_scsi_task(t);
        return;
    }
    r->status = t->status;
    if (t->residual_status == SCSI_RESIDUAL_UNDERFLOW)
        r->residual = t->residual;
    if (t->status == SCSI_STATUS_CHECK_CONDITION && t->datain.size > 2) {
        /* the response's data segment: 2-byte sense length, then the sense bytes */
        int n = (t->datain.data[0] << 8) | t->datain.data[1];
        if (n > t->datain.size - 2)
            n = t->datain.size - 2;
        if (n > (int)sizeof(r->sense))
            n = sizeof(r->sense);
        memcpy(r->sense, t->datain.data + 2, n);
        r->sense_len = n;
    }
    scsi_free_scsi_task(t);
}

/* ----------------------------------------------------------------- open / close */
static void load_pos(struct dev *d)
{
    FILE *f = fopen(d->pos_path, "r");
    d->fileno = d->blkno = 0;
    if (f) {
        if (fscanf(f, "%ld %ld", &d->fileno, &d->blkno) != 2)
            d->fileno = d->blkno = 0;
        fclose(f);
    }
}

static void save_pos(struct dev *d)
{
    FILE *f = fopen(d->pos_path, "w");
    if (f) {
        fprintf(f, "%ld %ld\n", d->fileno, d->blkno);
        fclose(f);
    }
}

/* Is *path* a device file? Then its URL is in *url*. Checked before the real open, so an
   O_TRUNC (dd of=...) never empties it. */
static int probe(const char *path, char *url, size_t size)
{
    struct stat st;
    ssize_t n;
    int cfd;

    if (stat(path, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size < 9 ||
        st.st_size > (off_t)size - 1)
        return 0;
    cfd = real_open(path, O_RDONLY);
    if (cfd < 0)
        return 0;
    n = real_read(cfd, url, size - 1);
    real_close(cfd);
    if (n < 9)
        return 0;
    url[n] = 0;
    if (strncmp(url, "iscsi://", 8) != 0)
        return 0;
    url[strcspn(url, "\r\n")] = 0;
    return 1;
}

static struct dev *attach(const char *path, int fd, const char *url)
{
    struct dev *d;
    struct iscsi_url *u;
    unsigned char inq[6] = {0x12, 0, 0, 0, 36, 0};
    unsigned char data[36];
    struct result r;

    if (fd >= MAXFD)
        return NULL;
    d = calloc(1, sizeof(*d));
    d->iscsi = iscsi_create_context("iqn.2026-12.org.vmdr:tape-preload");
    u = d->iscsi ? iscsi_parse_full_url(d->iscsi, url) : NULL;
    if (!u) {
        fprintf(stderr, "vmdr preload: bad url %s\n", url);
        goto fail;
    }
    iscsi_set_targetname(d->iscsi, u->target);
    iscsi_set_session_type(d->iscsi, ISCSI_SESSION_NORMAL);
    iscsi_set_header_digest(d->iscsi, ISCSI_HEADER_DIGEST_NONE_CRC32C);
    d->lun = u->lun;
    if (iscsi_full_connect_sync(d->iscsi, u->portal, u->lun) != 0) {
        fprintf(stderr, "vmdr preload: %s\n", iscsi_get_error(d->iscsi));
        iscsi_destroy_url(u);
        goto fail;
    }
    iscsi_destroy_url(u);
    command(d, inq, 6, SCSI_XFER_READ, data, sizeof(data), &r);
    d->tape = !r.transport_error && r.status == 0 && (data[0] & 0x1f) == 1;
    snprintf(d->pos_path, sizeof(d->pos_path), "%s.pos", path);
    if (d->tape)
        load_pos(d);
    d->refs = 1;
    devs[fd] = d;
    return d;
fail:
    if (d->iscsi)
        iscsi_destroy_context(d->iscsi);
    free(d);
    errno = EIO;
    return (struct dev *)-1;
}

static int wrap_open(const char *path, int flags, mode_t mode)
{
    int fd;
    struct dev *d;
    char url[1024];

    init();
    if (!path || !probe(path, url, sizeof(url)))
        return real_open(path, flags, mode);
    fd = real_open(path, flags & ~(O_TRUNC | O_CREAT | O_EXCL | O_APPEND), mode);
    if (fd < 0)
        return fd;
    d = attach(path, fd, url);
    if (d == (struct dev *)-1) {
        real_close(fd);
        errno = EIO;
        return -1;
    }
    return fd;
}

int open(const char *path, int flags, ...)
{
    mode_t mode = 0;
    if (flags & (O_CREAT | O_TMPFILE)) {
        va_list ap;
        va_start(ap, flags);
        mode = va_arg(ap, mode_t);
        va_end(ap);
    }
    return wrap_open(path, flags, mode);
}

int open64(const char *path, int flags, ...) __attribute__((alias("open")));

int __open_2(const char *path, int flags) { return wrap_open(path, flags, 0); }
int __open64_2(const char *path, int flags) { return wrap_open(path, flags, 0); }

static int write_filemarks(struct dev *d, int count)
{
    unsigned char cdb[6] = {0x10, 0, (count >> 16) & 0xff, (count >> 8) & 0xff, count & 0xff, 0};
    struct result r;
    command(d, cdb, 6, SCSI_XFER_NONE, NULL, 0, &r);
    if (r.transport_error || (r.status && sense_key(&r) > 1)) {
        errno = EIO;
        return -1;
    }
    d->fileno += count;
    d->blkno = 0;
    d->wrote = 0;
    return 0;
}

static void release(int fd)
{
    struct dev *d = dev_of(fd);
    if (!d)
        return;
    devs[fd] = NULL;
    if (--d->refs > 0)
        return;
    {
        if (d->tape && d->wrote)
            write_filemarks(d, 1);
        if (d->tape)
            save_pos(d);
        iscsi_logout_sync(d->iscsi);
        iscsi_destroy_context(d->iscsi);
        free(d);
    }
}

int close(int fd)
{
    init();
    release(fd);
    return real_close(fd);
}

static int share(int oldfd, int newfd)
{
    if (newfd >= 0 && newfd < MAXFD && newfd != oldfd && dev_of(oldfd)) {
        devs[newfd] = devs[oldfd];
        devs[newfd]->refs++;
    }
    return newfd;
}

int dup(int oldfd)
{
    static int (*real_dup)(int);
    if (!real_dup)
        real_dup = dlsym(RTLD_NEXT, "dup");
    return share(oldfd, real_dup(oldfd));
}

int dup2(int oldfd, int newfd)
{
    static int (*real_dup2)(int, int);
    int r;
    if (!real_dup2)
        real_dup2 = dlsym(RTLD_NEXT, "dup2");
    if (oldfd != newfd)
        release(newfd);
    r = real_dup2(oldfd, newfd);
    return r < 0 ? r : share(oldfd, r);
}

int dup3(int oldfd, int newfd, int flags)
{
    static int (*real_dup3)(int, int, int);
    int r;
    if (!real_dup3)
        real_dup3 = dlsym(RTLD_NEXT, "dup3");
    if (oldfd != newfd)
        release(newfd);
    r = real_dup3(oldfd, newfd, flags);
    return r < 0 ? r : share(oldfd, r);
}

/* dd truncates a regular output file to its seek offset: never the device file */
int ftruncate(int fd, off_t length)
{
    static int (*real_ftruncate)(int, off_t);
    if (dev_of(fd))
        return 0;
    if (!real_ftruncate)
        real_ftruncate = dlsym(RTLD_NEXT, "ftruncate");
    return real_ftruncate(fd, length);
}

int ftruncate64(int fd, off_t length) __attribute__((alias("ftruncate")));

/* ----------------------------------------------------------------- read / write */
ssize_t read(int fd, void *buf, size_t count)
{
    struct dev *d;
    unsigned char cdb[6];
    struct result r;
    size_t n = count > 0xffffff ? 0xffffff : count;

    init();
    d = dev_of(fd);
    if (!d || !d->tape)
        return real_read(fd, buf, count);
    if (d->wrote && write_filemarks(d, 1) < 0)
        return -1;
    cdb[0] = 0x08; cdb[1] = 0;  /* variable block mode, no SILI: short blocks give ILI */
    cdb[2] = (n >> 16) & 0xff; cdb[3] = (n >> 8) & 0xff; cdb[4] = n & 0xff; cdb[5] = 0;
    command(d, cdb, 6, SCSI_XFER_READ, buf, n, &r);
    if (r.transport_error) {
        errno = EIO;
        return -1;
    }
    if (r.status == 0) {
        d->blkno++;
        return (ssize_t)n;
    }
    if (sense_fm(&r)) {          /* the filemark: end of this file */
        d->fileno++;
        d->blkno = 0;
        return 0;
    }
    if (sense_key(&r) == 8) {    /* BLANK CHECK: end of data */
        errno = EIO;
        return -1;
    }
    if (sense_ili(&r)) {
        int32_t resid = sense_info(&r);  /* from the sense, not tgt's residual */
        if (resid < 0) {         /* the block is larger than the buffer */
            errno = ENOMEM;
            return -1;
        }
        d->blkno++;
        return (ssize_t)(n - (size_t)resid);
    }
    errno = EIO;
    return -1;
}

ssize_t write(int fd, const void *buf, size_t count)
{
    struct dev *d;
    unsigned char cdb[6];
    struct result r;

    init();
    d = dev_of(fd);
    if (!d || !d->tape)
        return real_write(fd, buf, count);
    if (count > 0xffffff) {
        errno = EINVAL;
        return -1;
    }
    if (d->eom_next) {           /* st: the early warning is reported once */
        d->eom_next = 0;
        errno = ENOSPC;
        return -1;
    }
    cdb[0] = 0x0a; cdb[1] = 0;
    cdb[2] = (count >> 16) & 0xff; cdb[3] = (count >> 8) & 0xff; cdb[4] = count & 0xff;
    cdb[5] = 0;
    command(d, cdb, 6, SCSI_XFER_WRITE, (void *)buf, count, &r);
    if (r.transport_error) {
        errno = EIO;
        return -1;
    }
    if (r.status == 0 || (sense_key(&r) <= 1 && sense_eom(&r))) {
        d->wrote = 1;
        d->blkno++;
        if (r.status)
            d->eom_next = 1;
        return (ssize_t)count;
    }
    if (sense_key(&r) == 7)
        errno = EROFS;
    else if (sense_key(&r) == 0xd || sense_eom(&r))
        errno = ENOSPC;
    else
        errno = EIO;
    return -1;
}

/* ----------------------------------------------------------------- ioctl */
static int sg_io(struct dev *d, sg_io_hdr_t *h)
{
    struct result r;
    int dir = h->dxfer_direction == SG_DXFER_TO_DEV ? SCSI_XFER_WRITE :
              (h->dxfer_direction == SG_DXFER_FROM_DEV ||
               h->dxfer_direction == SG_DXFER_TO_FROM_DEV) ? SCSI_XFER_READ : SCSI_XFER_NONE;
    size_t len = dir == SCSI_XFER_NONE ? 0 : h->dxfer_len;

    if (h->interface_id != 'S' || h->iovec_count) {
        errno = EINVAL;
        return -1;
    }
    command(d, h->cmdp, h->cmd_len, dir, h->dxferp, len, &r);
    if (getenv("VMDR_PRELOAD_DEBUG")) {
        fprintf(stderr, "SG_IO cdb");
        for (int i = 0; i < h->cmd_len; i++)
            fprintf(stderr, " %02x", h->cmdp[i]);
        fprintf(stderr, " dir %d len %zu -> status %d resid %zu sense %d key %d\n",
                dir, len, r.status, r.residual, r.sense_len, sense_key(&r));
    }
    h->status = h->masked_status = h->msg_status = 0;
    h->sb_len_wr = 0;
    h->host_status = h->driver_status = 0;
    h->resid = 0;
    h->duration = 1;
    h->info = 0;
    if (r.transport_error) {
        h->host_status = 0x01;   /* DID_NO_CONNECT */
        h->info = SG_INFO_CHECK;
        return 0;
    }
    h->status = (unsigned char)r.status;
    h->masked_status = (unsigned char)(r.status >> 1);
    h->resid = (int)r.residual;
    if (r.sense_len) {
        int n = r.sense_len < h->mx_sb_len ? r.sense_len : h->mx_sb_len;
        memcpy(h->sbp, r.sense, n);
        h->sb_len_wr = (unsigned char)n;
        h->driver_status = 0x08; /* DRIVER_SENSE */
    }
    if (r.status)
        h->info = SG_INFO_CHECK;
    return 0;
}

static int simple(struct dev *d, const unsigned char *cdb, struct result *r)
{
    command(d, cdb, 6, SCSI_XFER_NONE, NULL, 0, r);
    if (r->transport_error || (r->status && sense_key(r) > 1)) {
        errno = EIO;
        return -1;
    }
    return 0;
}

static int space(struct dev *d, int code, int count)
{
    unsigned char cdb[6] = {0x11, (unsigned char)code, (count >> 16) & 0xff,
                            (count >> 8) & 0xff, count & 0xff, 0};
    struct result r;
    command(d, cdb, 6, SCSI_XFER_NONE, NULL, 0, &r);
    /* Any CHECK CONDITION means the count was not done: tgt reports running into the
       end of data as NO SENSE + "end-of-data detected", not BLANK CHECK */
    if (r.transport_error || (r.status && sense_key(&r) != 1)) {
        errno = EIO;
        return -1;
    }
    return 0;
}

static int mt_op(struct dev *d, struct mtop *op)
{
    unsigned char rewind[6] = {0x01, 0, 0, 0, 0, 0};
    unsigned char unload[6] = {0x1b, 0, 0, 0, 0, 0};
    unsigned char load[6] = {0x1b, 0, 0, 0, 1, 0};
    struct result r;
    int n = op->mt_count;

    if (d->wrote && op->mt_op != MTWEOF && op->mt_op != MTWEOFI && write_filemarks(d, 1) < 0)
        return -1;
    switch (op->mt_op) {
    case MTREW:
        if (simple(d, rewind, &r) < 0)
            return -1;
        d->fileno = d->blkno = 0;
        return 0;
    case MTOFFL:
    case MTUNLOAD:
        if (simple(d, unload, &r) < 0)
            return -1;
        d->fileno = d->blkno = 0;
        return 0;
    case MTLOAD:
        if (simple(d, load, &r) < 0)
            return -1;
        d->fileno = d->blkno = 0;
        return 0;
    case MTWEOF:
    case MTWEOFI:
        return write_filemarks(d, n);
    case MTFSF:
        if (space(d, 1, n) < 0)
            return -1;
        d->fileno += n;
        d->blkno = 0;
        return 0;
    case MTBSF:
        if (space(d, 1, -n) < 0)
            return -1;
        d->fileno -= n;
        d->blkno = -1;
        return 0;
    case MTFSR:
        if (space(d, 0, n) < 0)
            return -1;
        d->blkno += n;
        return 0;
    case MTBSR:
        if (space(d, 0, -n) < 0)
            return -1;
        d->blkno -= n;
        return 0;
    case MTEOM:
        if (space(d, 3, 0) < 0)
            return -1;
        d->fileno = -1;  /* unknown: READ POSITION is not trusted */
        d->blkno = -1;
        return 0;
    case MTNOP:
    case MTSETBLK:
    case MTSETDENSITY:
    case MTSETDRVBUFFER:
    case MTCOMPRESSION:
        return 0;
    default:
        errno = ENOTTY;
        return -1;
    }
}

static int mt_get(struct dev *d, struct mtget *g)
{
    unsigned char tur[6] = {0, 0, 0, 0, 0, 0};
    unsigned char ms[6] = {0x1a, 0, 0, 0, 255, 0};
    unsigned char data[255];
    struct result r;

    memset(g, 0, sizeof(*g));
    g->mt_type = MT_ISSCSI2;
    g->mt_fileno = d->fileno;
    g->mt_blkno = d->blkno;
    command(d, tur, 6, SCSI_XFER_NONE, NULL, 0, &r);
    if (r.transport_error) {
        errno = EIO;
        return -1;
    }
    if (r.status == 0) {
        g->mt_gstat |= GMT_ONLINE(-1);
        memset(data, 0, sizeof(data));
        command(d, ms, 6, SCSI_XFER_READ, data, sizeof(data), &r);
        if (!r.transport_error && r.status == 0) {
            if (data[2] & 0x80)
                g->mt_gstat |= GMT_WR_PROT(-1);
            if (data[3] >= 8)
                g->mt_dsreg = (long)((data[4] << MT_ST_DENSITY_SHIFT) |
                                     (data[9] << 16 | data[10] << 8 | data[11]));
        }
        if (d->fileno == 0 && d->blkno == 0)
            g->mt_gstat |= GMT_BOT(-1);
    } else if (r.sense_len > 12 && r.sense[12] == 0x3a) {
        g->mt_gstat |= GMT_DR_OPEN(-1);
    }
    g->mt_gstat |= GMT_IM_REP_EN(-1);
    return 0;
}

int ioctl(int fd, unsigned long request, ...)
{
    va_list ap;
    void *arg;
    struct dev *d;

    init();
    va_start(ap, request);
    arg = va_arg(ap, void *);
    va_end(ap);
    d = dev_of(fd);
    if (!d)
        return real_ioctl(fd, request, arg);
    if (getenv("VMDR_PRELOAD_DEBUG"))
        fprintf(stderr, "ioctl %#lx\n", request);
    switch (request) {
    case SG_IO:
        return sg_io(d, (sg_io_hdr_t *)arg);
    case SG_GET_VERSION_NUM:
        *(int *)arg = 30536;
        return 0;
    case SG_GET_TIMEOUT:
        return 60 * 100;
    case 0x5382:  /* SCSI_IOCTL_GET_IDLUN: host 0, channel 0, id 0, our LUN */
        ((int *)arg)[0] = (d->lun & 0xff) << 8;
        ((int *)arg)[1] = 0;
        return 0;
    case 0x5386:  /* SCSI_IOCTL_GET_BUS_NUMBER */
        *(int *)arg = 0;
        return 0;
    case SG_SET_TIMEOUT:
    case SG_SET_RESERVED_SIZE:
        return 0;
    case SG_GET_RESERVED_SIZE:
        *(int *)arg = 1 << 20;
        return 0;
    case MTIOCTOP:
        if (!d->tape) break;
        return mt_op(d, (struct mtop *)arg);
    case MTIOCGET:
        if (!d->tape) break;
        return mt_get(d, (struct mtget *)arg);
    case MTIOCPOS:
        if (!d->tape) break;
        ((struct mtpos *)arg)->mt_blkno = d->blkno;
        return 0;
    default:
        break;
    }
    errno = ENOTTY;
    return -1;
}
