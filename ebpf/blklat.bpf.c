// SPDX-License-Identifier: (MIT OR GPL-2.0)
/*
 * blkrep block-layer latency: one log2 histogram of request latency per device and
 * operation, plus issue and completion counters, for the devices userspace lists in `devs`
 * (the ublk device and the volume's backing devices; nothing else is traced).
 *
 * A request's start time is recorded at block_rq_issue, keyed by the request pointer, and
 * consumed at block_rq_complete. Two flavours of each program: tp_btf (BTF-typed
 * tracepoints, direct arguments) and raw_tp (the fallback where BTF tracepoints are not
 * available); userspace loads whichever the kernel accepts. Struct offsets are CO-RE
 * relocated against the running kernel's BTF, so the object is built once (clang -g -O2
 * -target bpf) and runs on any kernel from 5.17 on (where struct request lost rq_disk).
 *
 * Every map value and key below is mirrored by a #[repr(C)] type in
 * ublk-target/src/latency/bpf.rs; change both together (NR_OPS and the op order too).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

char LICENSE[] SEC("license") = "Dual MIT/GPL";

/* Only the fields we read; CO-RE finds them in the running kernel. */
struct gendisk {
	int major;
	int first_minor;
} __attribute__((preserve_access_index));

struct request_queue {
	struct gendisk *disk;
} __attribute__((preserve_access_index));

struct request {
	struct request_queue *q;
	unsigned int cmd_flags;
} __attribute__((preserve_access_index));

#define REQ_OP_MASK 0xff
#define REQ_OP_READ 0
#define REQ_OP_WRITE 1
#define REQ_OP_FLUSH 2
#define REQ_OP_DISCARD 3

enum { OP_READ, OP_WRITE, OP_FLUSH, OP_DISCARD, OP_OTHER, NR_OPS };

#define SLOTS 32
#define MAX_DEVS 64

struct hval {
	__u64 slots[SLOTS]; /* slot i: latency in [2^i, 2^(i+1)) microseconds (slot 0 from 0) */
	__u64 total_ns;     /* sum of the latencies in the histogram */
	__u64 issued;       /* requests issued to the device */
	__u64 completed;    /* requests completed (with or without a recorded issue) */
};

/* In-flight requests of traced devices: issue time (ns), keyed by the request pointer. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, __u64);
} starts SEC(".maps");

/* Traced devices: MKDEV(major, minor) -> device index (0..MAX_DEVS-1), set by userspace. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_DEVS);
	__type(key, __u32);
	__type(value, __u32);
} devs SEC(".maps");

/* Histograms, indexed by device index * NR_OPS + op: an array, so the lookup is inlined. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_DEVS * NR_OPS);
	__type(key, __u32);
	__type(value, struct hval);
} hists SEC(".maps");

static __always_inline __u32 op_of(unsigned int cmd_flags)
{
	switch (cmd_flags & REQ_OP_MASK) {
	case REQ_OP_READ:
		return OP_READ;
	case REQ_OP_WRITE:
		return OP_WRITE;
	case REQ_OP_FLUSH:
		return OP_FLUSH;
	case REQ_OP_DISCARD:
		return OP_DISCARD;
	default:
		return OP_OTHER;
	}
}

/* The histogram entry of a request, or -1 when its device is not traced. */
static __always_inline int entry_of(int major, int first_minor, unsigned int cmd_flags)
{
	__u32 dev = ((__u32)major << 20) | (__u32)first_minor;
	__u32 *di = bpf_map_lookup_elem(&devs, &dev);
	if (!di || *di >= MAX_DEVS)
		return -1;
	return *di * NR_OPS + op_of(cmd_flags);
}

/* The histogram entry `idx`, or NULL for an untraced device (idx < 0). */
static __always_inline struct hval *hist_at(int idx)
{
	if (idx < 0)
		return NULL;
	__u32 i = idx;
	return bpf_map_lookup_elem(&hists, &i);
}

static __always_inline int on_issue(__u64 rq, int idx)
{
	struct hval *v = hist_at(idx);
	if (!v)
		return 0;
	__u64 ts = bpf_ktime_get_ns();
	bpf_map_update_elem(&starts, &rq, &ts, BPF_ANY);
	__sync_fetch_and_add(&v->issued, 1);
	return 0;
}

static __always_inline int on_complete(__u64 rq, int idx)
{
	struct hval *v = hist_at(idx);
	if (!v)
		return 0;
	__sync_fetch_and_add(&v->completed, 1);
	__u64 *ts = bpf_map_lookup_elem(&starts, &rq);
	if (!ts)
		return 0; /* issued before we attached */
	__u64 delta = bpf_ktime_get_ns() - *ts;
	bpf_map_delete_elem(&starts, &rq);
	__u64 us = delta / 1000;
	__u32 slot = 0;
	/* log2, bounded for the verifier */
#pragma unroll
	for (int b = 0; b < SLOTS - 1; b++) {
		if (us >> (b + 1))
			slot = b + 1;
	}
	if (slot >= SLOTS)
		slot = SLOTS - 1;
	__sync_fetch_and_add(&v->slots[slot], 1);
	__sync_fetch_and_add(&v->total_ns, delta);
	return 0;
}

/*
 * BTF tracepoints: the arguments are typed pointers the verifier lets us dereference
 * directly (plain loads, CO-RE relocated), no probe_read helper calls.
 */
static __always_inline int entry_btf(struct request *rq)
{
	struct gendisk *disk = rq->q->disk;
	if (!disk)
		return -1;
	return entry_of(disk->major, disk->first_minor, rq->cmd_flags);
}

SEC("tp_btf/block_rq_issue")
int BPF_PROG(blk_issue_btf, struct request *rq)
{
	return on_issue((__u64)rq, entry_btf(rq));
}

SEC("tp_btf/block_rq_complete")
int BPF_PROG(blk_complete_btf, struct request *rq)
{
	return on_complete((__u64)rq, entry_btf(rq));
}

/* Raw tracepoints: untyped arguments, read through bpf_probe_read_kernel (BPF_CORE_READ). */
static __always_inline int entry_raw(struct request *rq)
{
	struct gendisk *disk = BPF_CORE_READ(rq, q, disk);
	if (!disk)
		return -1;
	return entry_of(BPF_CORE_READ(disk, major), BPF_CORE_READ(disk, first_minor),
			BPF_CORE_READ(rq, cmd_flags));
}

SEC("raw_tp/block_rq_issue")
int blk_issue_raw(struct bpf_raw_tracepoint_args *ctx)
{
	struct request *rq = (struct request *)ctx->args[0];
	return on_issue((__u64)rq, entry_raw(rq));
}

SEC("raw_tp/block_rq_complete")
int blk_complete_raw(struct bpf_raw_tracepoint_args *ctx)
{
	struct request *rq = (struct request *)ctx->args[0];
	return on_complete((__u64)rq, entry_raw(rq));
}
