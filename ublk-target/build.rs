//! Compiles the BPF programs in `../ebpf/` with clang (`-g -O2 -target bpf`, CO-RE) into
//! `$OUT_DIR`, where `src/latency/bpf.rs` embeds them. Stable Rust cannot build BPF
//! programs, hence C. Without clang (or libbpf's headers) the daemon is built without
//! them: a build warning, and at run time it reports eBPF as unavailable with that reason
//! and serves the userspace stage latencies only.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let src = PathBuf::from("../ebpf/blklat.bpf.c");
    let obj = out.join("blklat.bpf.o");
    let why = out.join("blklat.bpf.missing");
    println!("cargo:rerun-if-changed=../ebpf/blklat.bpf.c");
    println!("cargo:rerun-if-env-changed=BLKREP_CLANG");
    println!("cargo:rerun-if-env-changed=BLKREP_NO_EBPF");
    let clang = std::env::var("BLKREP_CLANG").unwrap_or_else(|_| "clang".into());
    let fail = |reason: String| {
        println!(
            "cargo:warning=blkrepd is built without its eBPF programs: {reason}; \
             install clang and libbpf-dev (scripts/install-deps.sh) for block-device latency"
        );
        std::fs::write(&obj, b"").expect("write empty object");
        std::fs::write(&why, reason).expect("write reason");
    };
    if std::env::var_os("BLKREP_NO_EBPF").is_some() {
        fail("BLKREP_NO_EBPF was set at build time".into());
        return;
    }
    // linux/bpf.h includes asm/types.h, which Debian keeps under the multiarch directory.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let (target_arch, multiarch) = match arch.as_str() {
        "x86_64" => ("x86", "x86_64-linux-gnu"),
        "aarch64" => ("arm64", "aarch64-linux-gnu"),
        other => ("", other),
    };
    let mut cmd = Command::new(&clang);
    cmd.args(["-g", "-O2", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-D__TARGET_ARCH_{target_arch}"))
        .arg(format!("-I/usr/include/{multiarch}"))
        .arg("-c")
        .arg(&src)
        .arg("-o")
        .arg(&obj);
    match cmd.output() {
        Ok(o) if o.status.success() => std::fs::write(&why, b"").expect("write reason"),
        Ok(o) => fail(format!(
            "{clang} failed on ebpf/blklat.bpf.c: {}",
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .find(|l| l.contains("error"))
                .unwrap_or("(no error line)")
        )),
        Err(e) => fail(format!("cannot run {clang}: {e}")),
    }
}
