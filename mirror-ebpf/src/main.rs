//! Kernel side of the mirror: an XDP and two TC programs (ingress and
//! egress) that share one parse-and-filter core, copy subscribed TCP
//! packets into the ring of the CPU they run on, and always let every
//! packet through untouched: XDP passes it, TC hands it on to whatever
//! comes next on the interface.
//!
//! Which packets: at ingress (TC or XDP) those whose destination port is
//! subscribed (client to server); at TC egress those whose source port is
//! subscribed (server to client). On `lo` every packet passes both hooks,
//! egress first: the rule alone already keeps a client's packet to the
//! ingress record and a server's answer to the egress one, except for a
//! packet whose two ports are both subscribed, which egress leaves to
//! ingress there. No packet is ever recorded twice.
#![no_std]
#![no_main]

mod emit;
mod packet;
mod parse;

use aya_ebpf::{
    EbpfContext,
    bindings::{TC_ACT_UNSPEC, xdp_action},
    btf_maps::{Array, ArrayOfMaps, LruHashMap, PerCpuArray},
    helpers::generated::{bpf_get_smp_processor_id, bpf_ktime_get_boot_ns},
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::warn;
use mirror_common::{
    COUNTER_COUNT, Counter, LOST_FLOWS_CAPACITY, LostFlow, MAX_CPUS, MAX_SNAPLEN, PORT_MAP_LEN,
    RecordHeader, in_sample, record_flags,
};

/// The index of `lo` in every network namespace (the kernel's
/// `LOOPBACK_IFINDEX`).
const LOOPBACK_IFINDEX: u32 = 1;

use crate::{
    emit::{Ring, emit},
    packet::Packet,
    parse::{Parsed, parse},
};

/// Non-zero at index P: mirror TCP packets to destination port P at
/// ingress, from source port P at egress.
#[btf_map]
static MIRROR_PORTS: Array<u8, { PORT_MAP_LEN as usize }> = Array::new();

/// One ring per CPU, indexed by CPU id, created and inserted by the loader.
#[btf_map]
static MIRROR_RINGS: ArrayOfMaps<Ring, { MAX_CPUS as usize }> = ArrayOfMaps::new();

/// Flows that lost a packet to a full ring; userspace closes them as `gap`.
#[btf_map]
static MIRROR_LOST: LruHashMap<LostFlow, u64, { LOST_FLOWS_CAPACITY as usize }> = LruHashMap::new();

/// Outcome counters, see [`Counter`].
#[btf_map]
static MIRROR_COUNTERS: PerCpuArray<u64, { COUNTER_COUNT as usize }> = PerCpuArray::new();

/// Packet bytes kept per record; set by the loader (`.rodata`, so the
/// verifier sees a constant).
#[unsafe(no_mangle)]
static MIRROR_SNAPLEN: u32 = MAX_SNAPLEN;

/// Unread bytes at which a ring wakes its reader (see `emit::wakeup_flags`);
/// set by the loader.
#[unsafe(no_mangle)]
static MIRROR_WAKEUP_BYTES: u64 = 0;

/// Percentage of connections mirrored (`--sample`); set by the loader.
#[unsafe(no_mangle)]
static MIRROR_SAMPLE_PERCENT: u32 = 100;

/// Seed of the sample hash; set by the loader.
#[unsafe(no_mangle)]
static MIRROR_SAMPLE_SEED: u32 = 0;

/// Where the interface's network namespace cookie is, as byte offsets
/// from the kernel's BTF (see `mirror_common::GLOBAL_NETNS_SKB_DEV`); set
/// by the loader only when watched interfaces of different namespaces
/// share an index. While `MIRROR_NETNS_NET_COOKIE` is 0 the verifier
/// prunes the reads away.
#[unsafe(no_mangle)]
static MIRROR_NETNS_SKB_DEV: u32 = 0;
#[unsafe(no_mangle)]
static MIRROR_NETNS_XDP_RXQ: u32 = 0;
#[unsafe(no_mangle)]
static MIRROR_NETNS_RXQ_DEV: u32 = 0;
#[unsafe(no_mangle)]
static MIRROR_NETNS_DEV_NET: u32 = 0;
#[unsafe(no_mangle)]
static MIRROR_NETNS_NET_COOKIE: u32 = 0;

#[xdp(frags)]
pub fn mirror_xdp(ctx: XdpContext) -> u32 {
    observe::<_, false>(&ctx);
    xdp_action::XDP_PASS
}

/// Returns "no verdict" (`TC_ACT_UNSPEC`, which TCX calls `TCX_NEXT`):
/// the next TCX program, then the clsact filters, then the stack decide
/// about the packet exactly as if the mirror were not attached. An "OK"
/// verdict would end the chain and switch off every firewall, policer or
/// CNI program behind the mirror.
#[classifier]
pub fn mirror_tc(ctx: TcContext) -> i32 {
    observe::<_, false>(&ctx);
    TC_ACT_UNSPEC
}

/// The TC egress program: the server's answers. Same verdict as at
/// ingress: no verdict, so that every egress filter, shaper or CNI program
/// behind it decides as if the mirror were not attached.
#[classifier]
pub fn mirror_egress(ctx: TcContext) -> i32 {
    observe::<_, true>(&ctx);
    TC_ACT_UNSPEC
}

/// Counts the packet and mirrors it when subscribed. Never fails and never
/// touches the packet: the caller passes it on whatever happens here.
#[inline(always)]
fn observe<P: Packet + EbpfContext, const EGRESS: bool>(pkt: &P) {
    count(Counter::Seen);
    let outcome = match mirror::<P, EGRESS>(pkt) {
        Ok(truncated) => {
            if truncated {
                count(Counter::Truncated);
            }
            Counter::Mirrored
        }
        Err(reason) => reason,
    };
    count(outcome);
}

/// Whether TCP port `port` is mirrored.
#[inline(always)]
fn subscribed(port: u16) -> bool {
    matches!(MIRROR_PORTS.get(u32::from(port)), Some(value) if *value != 0)
}

/// Mirrors `pkt` if it is TCP to a subscribed port (ingress) or from one
/// (egress); `Ok(true)` when it was cut at the snap length.
#[inline(always)]
fn mirror<P: Packet + EbpfContext, const EGRESS: bool>(pkt: &P) -> Result<bool, Counter> {
    let parsed = parse(pkt)?;
    if EGRESS {
        // On lo the packet comes back through ingress right after, where a
        // subscribed destination port has it recorded (as client to
        // server, which is what two subscribed ports have always meant).
        if !subscribed(parsed.src_port)
            || (pkt.ifindex() == LOOPBACK_IFINDEX && subscribed(parsed.dst_port))
        {
            return Err(Counter::NotSubscribed);
        }
    } else if !subscribed(parsed.dst_port) {
        return Err(Counter::NotSubscribed);
    }
    // SAFETY: a plain read of a global the loader may have rewritten.
    let percent = unsafe { core::ptr::read_volatile(&MIRROR_SAMPLE_PERCENT) };
    // A constant to the verifier: at 100 it prunes the hash away.
    if percent < 100 {
        // Both directions of a connection hash alike: as client to server.
        let flow = flow::<P, EGRESS>(pkt, &parsed).ok_or(Counter::Unparseable)?;
        // SAFETY: as above.
        let seed = unsafe { core::ptr::read_volatile(&MIRROR_SAMPLE_SEED) };
        if !in_sample(flow.sample_hash(seed), percent) {
            return Err(Counter::NotSampled);
        }
    }

    let wire_len = pkt.len();
    // SAFETY: a plain read of a global the loader may have rewritten.
    let snaplen = unsafe { core::ptr::read_volatile(&MIRROR_SNAPLEN) };
    // The headers always fit (the parser checked them against wire_len),
    // whatever the snap length, so userspace can always read seq/ack.
    let cap_len = wire_len
        .min(snaplen.max(parsed.l4_end as u32))
        .min(MAX_SNAPLEN);

    // SAFETY: helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let Some(ring) = MIRROR_RINGS.get(cpu) else {
        // The loader creates a ring for every online CPU; a CPU brought
        // online later has none until the mirror restarts.
        warn!(pkt, "no ring for cpu {}, packet not mirrored", cpu);
        return Err(Counter::RingFull);
    };

    let mut flags = P::FLAGS;
    if EGRESS {
        flags |= record_flags::EGRESS | record_flags::SERVER_TO_CLIENT;
    }
    if parsed.ipv6 {
        flags |= record_flags::IPV6;
    }
    if cap_len < wire_len {
        flags |= record_flags::TRUNCATED;
    }
    let header = RecordHeader {
        // SAFETY: helper without arguments.
        ts_ns: unsafe { bpf_ktime_get_boot_ns() },
        ifindex: pkt.ifindex(),
        wire_len,
        cap_len,
        cpu,
        flags,
        l3_offset: parsed.l3_offset as u16,
        l4_offset: parsed.l4_offset as u16,
        netns_cookie: netns_cookie(pkt),
    };
    if let Err(reason) = emit(ring, pkt, &header) {
        if reason == Counter::RingFull && parsed.matters_to_the_stream() {
            record_loss::<P, EGRESS>(pkt, &parsed);
        }
        return Err(reason);
    }
    Ok(cap_len < wire_len)
}

/// The cookie of the network namespace `pkt`'s interface is in, or 0 when
/// the loader did not ask for it (or a read failed: counted).
#[inline(always)]
fn netns_cookie<P: Packet>(pkt: &P) -> u64 {
    // SAFETY: plain reads of globals the loader may have rewritten.
    let (cookie, net) = unsafe {
        (
            core::ptr::read_volatile(&MIRROR_NETNS_NET_COOKIE) as usize,
            core::ptr::read_volatile(&MIRROR_NETNS_DEV_NET) as usize,
        )
    };
    if cookie == 0 {
        return 0;
    }
    let found = pkt
        .device()
        .and_then(|dev| packet::read_address(dev + net))
        .and_then(|net_ns| packet::read_address(net_ns + cookie));
    match found {
        Some(cookie) => cookie as u64,
        None => {
            count(Counter::NetnsUnknown);
            0
        }
    }
}

/// Notes the flow of a packet the ring could not take, so that its stream
/// ends as `gap` in userspace instead of silently missing bytes.
#[inline(never)]
fn record_loss<P: Packet, const EGRESS: bool>(pkt: &P, parsed: &Parsed) {
    let Some(key) = flow::<P, EGRESS>(pkt, parsed) else {
        return;
    };
    match MIRROR_LOST.get_ptr_mut(key) {
        // Only the entry's presence matters; the count is for the logs and
        // may miss an increment when two CPUs race.
        // SAFETY: a map value of this program, valid for this run.
        Some(count) => unsafe { *count += 1 },
        None => {
            // Full map: the least recently used entry makes room (LRU).
            let _ = MIRROR_LOST.insert(key, 1u64, 0);
        }
    }
}

/// The client-to-server 4-tuple of a parsed packet's connection: the
/// packet's own at ingress, swapped at egress (`None`: its addresses cannot
/// be read, which the parser's checks rule out).
#[inline(always)]
fn flow<P: Packet, const EGRESS: bool>(pkt: &P, parsed: &Parsed) -> Option<LostFlow> {
    let mut key = LostFlow {
        src_port: parsed.src_port,
        dst_port: parsed.dst_port,
        ..LostFlow::default()
    };
    let ok = if parsed.ipv6 {
        key.ip_version = 6;
        // Source at byte 8 of the IPv6 header, destination at 24.
        pkt.load_into(parsed.l3_offset + 8, &mut key.src_addr)
            && pkt.load_into(parsed.l3_offset + 24, &mut key.dst_addr)
    } else {
        key.ip_version = 4;
        // Source at byte 12 of the IPv4 header, destination at 16.
        let mut src = [0u8; 4];
        let mut dst = [0u8; 4];
        let ok = pkt.load_into(parsed.l3_offset + 12, &mut src)
            && pkt.load_into(parsed.l3_offset + 16, &mut dst);
        key.src_addr[..4].copy_from_slice(&src);
        key.dst_addr[..4].copy_from_slice(&dst);
        ok
    };
    if EGRESS {
        core::mem::swap(&mut key.src_addr, &mut key.dst_addr);
        core::mem::swap(&mut key.src_port, &mut key.dst_port);
        key.server_to_client = 1;
    }
    ok.then_some(key)
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(value) = MIRROR_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot of this CPU; programs do not migrate mid-run.
        unsafe { *value += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // A reachable panic becomes an infinite loop, which the verifier
    // rejects at load time instead of running undefined behaviour.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
