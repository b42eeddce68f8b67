/*
 * vmdr-writer: sequential, checksummed record writer for the vmdr test guest.
 *
 * usage: vmdr-writer DEVICE RATE
 *
 * Writes 4096-byte records (format: tests/guest/layout.py) to the block device DEVICE
 * with O_DIRECT|O_DSYNC, RATE records per second (0 = do nothing, sleep forever).
 * Record seq goes to slot seq % nslots; the writer wraps around and keeps counting.
 * On start it resumes after the newest valid record already on the device (binary search
 * over the slots), so a rebooted or restored guest continues the same sequence.
 * Prints "VMDR-WRITER seq=<n>" about every 2 seconds.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define RECORD_SIZE 4096
#define PAYLOAD_OFFSET 32
#define PAYLOAD_WORDS 507
#define PAYLOAD_XOR 0xA5A5A5A55A5A5A5AULL
#define CRC_OFFSET (RECORD_SIZE - 4)
static const char MAGIC[8] = {'V', 'M', 'D', 'R', 'R', 'E', 'C', '1'};

static uint32_t crc_table[256];

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320U ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc32_buf(const unsigned char *p, size_t n) {
    uint32_t c = 0xFFFFFFFFU;
    while (n--)
        c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFU;
}

static void put_u32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static void put_u64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static uint32_t get_u32(const unsigned char *p) {
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}
static uint64_t get_u64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static int fd;
static uint64_t nslots;
static unsigned char *buf;

/* Read slot; return 1 and set *seq if it holds a valid record for that slot. */
static int read_slot(uint64_t slot, uint64_t *seq) {
    ssize_t r = pread(fd, buf, RECORD_SIZE, (off_t)(slot * RECORD_SIZE));
    if (r != RECORD_SIZE) return 0;
    if (memcmp(buf, MAGIC, 8) != 0) return 0;
    if (get_u32(buf + CRC_OFFSET) != crc32_buf(buf, CRC_OFFSET)) return 0;
    if (get_u32(buf + 24) != (uint32_t)nslots) return 0;
    uint64_t s = get_u64(buf + 8);
    if (s % nslots != slot) return 0;
    *seq = s;
    return 1;
}

/* Next sequence number to write, resuming after the newest valid record. */
static uint64_t find_resume(void) {
    uint64_t s0, s;
    if (!read_slot(0, &s0)) {
        /* slot 0 empty/torn: either fresh area, or a torn write at the wrap point */
        if (read_slot(nslots - 1, &s)) return s + 1;
        return 0;
    }
    uint64_t lap = s0 / nslots;
    /* slots [0, lo] hold lap `lap`; find the last such slot (lap is non-increasing) */
    uint64_t lo = 0, hi = nslots; /* invariant: slot lo in lap, slot hi not (or end) */
    while (hi - lo > 1) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (read_slot(mid, &s) && s / nslots == lap)
            lo = mid;
        else
            hi = mid;
    }
    return lap * nslots + lo + 1;
}

static void fill_record(uint64_t seq, uint32_t session) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    memset(buf, 0, RECORD_SIZE);
    memcpy(buf, MAGIC, 8);
    put_u64(buf + 8, seq);
    put_u64(buf + 16, (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec);
    put_u32(buf + 24, (uint32_t)nslots);
    put_u32(buf + 28, session);
    uint64_t w = seq ^ PAYLOAD_XOR;
    for (int i = 0; i < PAYLOAD_WORDS; i++) put_u64(buf + PAYLOAD_OFFSET + 8 * i, w);
    put_u32(buf + CRC_OFFSET, crc32_buf(buf, CRC_OFFSET));
}

static void ts_add_ns(struct timespec *t, uint64_t ns) {
    t->tv_nsec += (long)(ns % 1000000000ULL);
    t->tv_sec += (time_t)(ns / 1000000000ULL);
    if (t->tv_nsec >= 1000000000L) {
        t->tv_nsec -= 1000000000L;
        t->tv_sec++;
    }
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s DEVICE RATE\n", argv[0]);
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *dev = argv[1];
    long rate = strtol(argv[2], NULL, 10);
    if (rate <= 0) {
        printf("VMDR-WRITER off dev=%s\n", dev);
        for (;;) pause();
    }
    crc_init();
    fd = open(dev, O_RDWR | O_DIRECT | O_DSYNC);
    if (fd < 0) {
        printf("VMDR-WRITER error open %s: %s\n", dev, strerror(errno));
        return 1;
    }
    uint64_t bytes = 0;
    if (ioctl(fd, BLKGETSIZE64, &bytes) != 0) {
        printf("VMDR-WRITER error size %s: %s\n", dev, strerror(errno));
        return 1;
    }
    nslots = bytes / RECORD_SIZE;
    if (nslots < 2 || posix_memalign((void **)&buf, RECORD_SIZE, RECORD_SIZE) != 0) {
        printf("VMDR-WRITER error area too small or no memory\n");
        return 1;
    }
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    uint32_t session = (uint32_t)(now.tv_nsec ^ (now.tv_sec << 8) ^ getpid());
    uint64_t seq = find_resume();
    printf("VMDR-WRITER start seq=%llu slots=%llu rate=%ld dev=%s\n", (unsigned long long)seq,
           (unsigned long long)nslots, rate, dev);

    uint64_t period_ns = 1000000000ULL / (uint64_t)rate;
    struct timespec next, last_print;
    clock_gettime(CLOCK_MONOTONIC, &next);
    last_print = next;
    for (;; seq++) {
        fill_record(seq, session);
        off_t off = (off_t)((seq % nslots) * RECORD_SIZE);
        ssize_t w = pwrite(fd, buf, RECORD_SIZE, off);
        if (w != RECORD_SIZE) {
            printf("VMDR-WRITER error write seq=%llu: %s\n", (unsigned long long)seq,
                   w < 0 ? strerror(errno) : "short write");
            sleep(1);
            seq--; /* retry the same record */
            continue;
        }
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec - last_print.tv_sec >= 2) {
            printf("VMDR-WRITER seq=%llu\n", (unsigned long long)seq);
            last_print = now;
        }
        ts_add_ns(&next, period_ns);
        if (now.tv_sec > next.tv_sec + 1) next = now; /* fell behind: do not burst */
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
    }
}
