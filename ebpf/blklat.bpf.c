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
 * ublk-target/src/latency/bpf.rs; change both together.
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

enum { OP_READ, OP_WRITE, OP_FLUSH, OP_DISCARD, OP_OTHER };

#define SLOTS 32

struct hkey {
	__u32 dev; /* MKDEV: major << 20 | minor */
	__u32 op;
};

struct hval {
	__u64 slots[SLOTS]; /* slot i: latency in [2^i, 2^(i+1)) microseconds (slot 0 from 0) */
	__u64 total_ns;     /* sum of the latencies in the histogram */
	__u64 issued;       /* requests issued to the device */
	__u64 completed;    /* requests completed (with or without a recorded issue) */
};

struct start {
	__u64 ts;
	__u32 dev;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct start);
} starts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u8);
} devs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 320);
	__type(key, struct hkey);
	__type(value, struct hval);
} hists SEC(".maps");

static __always_inline __u32 rq_dev(struct request *rq)
{
	struct gendisk *disk = BPF_CORE_READ(rq, q, disk);
	if (!disk)
		return 0;
	__u32 major = BPF_CORE_READ(disk, major);
	__u32 minor = BPF_CORE_READ(disk, first_minor);
	return (major << 20) | minor;
}

static __always_inline __u32 rq_op(struct request *rq)
{
	switch (BPF_CORE_READ(rq, cmd_flags) & REQ_OP_MASK) {
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

static __always_inline struct hval *hist_of(__u32 dev, __u32 op)
{
	struct hkey k = { .dev = dev, .op = op };
	struct hval *v = bpf_map_lookup_elem(&hists, &k);
	if (v)
		return v;
	struct hval zero = {};
	bpf_map_update_elem(&hists, &k, &zero, BPF_NOEXIST);
	return bpf_map_lookup_elem(&hists, &k);
}

static __always_inline int on_issue(struct request *rq)
{
	__u32 dev = rq_dev(rq);
	if (!bpf_map_lookup_elem(&devs, &dev))
		return 0;
	__u64 key = (__u64)rq;
	struct start s = { .ts = bpf_ktime_get_ns(), .dev = dev };
	bpf_map_update_elem(&starts, &key, &s, BPF_ANY);
	struct hval *v = hist_of(dev, rq_op(rq));
	if (v)
		__sync_fetch_and_add(&v->issued, 1);
	return 0;
}

static __always_inline int on_complete(struct request *rq)
{
	__u32 dev = rq_dev(rq);
	if (!bpf_map_lookup_elem(&devs, &dev))
		return 0;
	struct hval *v = hist_of(dev, rq_op(rq));
	if (!v)
		return 0;
	__sync_fetch_and_add(&v->completed, 1);
	__u64 key = (__u64)rq;
	struct start *s = bpf_map_lookup_elem(&starts, &key);
	if (!s)
		return 0; /* issued before we attached */
	__u64 delta = bpf_ktime_get_ns() - s->ts;
	bpf_map_delete_elem(&starts, &key);
	__u64 us = delta / 1000;
	__u32 slot = 0;
	/* log2, bounded for the verifier */
#pragma unroll
	for (int i = 0; i < SLOTS - 1; i++) {
		if (us >> (i + 1))
			slot = i + 1;
	}
	if (slot >= SLOTS)
		slot = SLOTS - 1;
	__sync_fetch_and_add(&v->slots[slot], 1);
	__sync_fetch_and_add(&v->total_ns, delta);
	return 0;
}

SEC("tp_btf/block_rq_issue")
int blk_issue_btf(__u64 *ctx)
{
	return on_issue((struct request *)ctx[0]);
}

SEC("tp_btf/block_rq_complete")
int blk_complete_btf(__u64 *ctx)
{
	return on_complete((struct request *)ctx[0]);
}

SEC("raw_tp/block_rq_issue")
int blk_issue_raw(struct bpf_raw_tracepoint_args *ctx)
{
	return on_issue((struct request *)ctx->args[0]);
}

SEC("raw_tp/block_rq_complete")
int blk_complete_raw(struct bpf_raw_tracepoint_args *ctx)
{
	return on_complete((struct request *)ctx->args[0]);
}
