//! Loading the kernel programs and owning their maps: the port map, the
//! per-CPU rings and the counters.

use std::{
    io,
    net::{IpAddr, SocketAddr},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, ArrayOfMaps, Map, MapData, MapError, MapType, RingBuf},
    programs::{ProgramError, SchedClassifier, Xdp},
};
use aya_log::EbpfLogger;
use mirror_common::{
    GLOBAL_NETNS_DEV_NET, GLOBAL_NETNS_NET_COOKIE, GLOBAL_NETNS_RXQ_DEV, GLOBAL_NETNS_SKB_DEV,
    GLOBAL_NETNS_XDP_RXQ, GLOBAL_SAMPLE_PERCENT, GLOBAL_SAMPLE_SEED, GLOBAL_SNAPLEN,
    GLOBAL_WAKEUP_BYTES, LostFlow, MAP_COUNTERS, MAP_LOST_FLOWS, MAP_PORTS, MAP_RINGS, MAX_CPUS,
    PROG_TC, PROG_TC_EGRESS, PROG_XDP,
};

use std::sync::Arc;

use crate::{
    flow::model::FlowKey,
    kernel::{
        btf::NetnsPath,
        counters::{KernelCounters, KernelSnapshot},
        ring_fill::{RingFill, RingFills},
    },
};

/// The eBPF object built by `cargo xtask build-ebpf`, embedded so that one
/// file is deployed; empty in a build that had none (see build.rs).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("MIRROR_EBPF_OBJECT"));

/// Name of the aya-log ring in the object (present when the programs log).
const AYA_LOG_MAP: &str = "AYA_LOGS";

/// Settings fixed when the programs are loaded.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// Packet bytes kept per record.
    pub snaplen: u32,
    /// Bytes of each CPU's ring (a power of two, at least a page).
    pub ring_size: u32,
    /// Most verbose kernel log level that reaches userspace
    /// (0 off, 1 error ... 5 trace, as aya-log numbers them).
    pub kernel_log_level: u8,
    /// Whole connections mirrored, in percent (1..=100; 100: all).
    pub sample: Sample,
    /// Where the programs find each packet's network namespace cookie,
    /// when watched interfaces of different namespaces share an index
    /// (records carry 0 otherwise).
    pub netns_path: Option<NetnsPath>,
}

/// Which connections the kernel mirrors: those whose 4-tuple hashes into
/// the first `percent` of the hash range ([`mirror_common::in_sample`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub percent: u8,
    pub seed: u32,
}

impl Sample {
    /// Every connection.
    pub const ALL: Self = Self {
        percent: 100,
        seed: 0,
    };

    /// `percent` of the connections, chosen with a random seed: which
    /// connections are skipped cannot be known (or chosen) from outside.
    pub fn random(percent: u8) -> Result<Self, getrandom::Error> {
        let mut seed = [0u8; 4];
        getrandom::fill(&mut seed)?;
        Ok(Self {
            percent: percent.clamp(1, 100),
            seed: u32::from_ne_bytes(seed),
        })
    }

    /// Whether the kernel mirrors the connection `flow`.
    pub fn includes(&self, flow: &LostFlow) -> bool {
        self.percent >= 100
            || mirror_common::in_sample(flow.sample_hash(self.seed), u32::from(self.percent))
    }
}

/// Which of the entry points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgramKind {
    Xdp,
    /// TC ingress.
    Tc,
    /// TC egress.
    TcEgress,
}

impl ProgramKind {
    const fn name(self) -> &'static str {
        match self {
            Self::Xdp => PROG_XDP,
            Self::Tc => PROG_TC,
            Self::TcEgress => PROG_TC_EGRESS,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "this kernel has no BPF {feature}: mirror needs Linux {version} or newer with BPF enabled"
    )]
    KernelFeature {
        feature: &'static str,
        version: &'static str,
    },
    #[error(
        "the kernel refused to load BPF objects (permission denied): run mirror as root, or with the capabilities CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN"
    )]
    PermissionDenied,
    #[error("the kernel refused to load the mirror's BPF maps: {0}")]
    Ebpf(#[source] Box<EbpfError>),
    #[error(
        "the kernel's verifier rejected the {name} program (a bug in this build of mirror, or a kernel it does not support); the end of its log:\n{log_tail}"
    )]
    Verifier {
        name: &'static str,
        log_tail: String,
    },
    #[error("the kernel refused to load the {name} program: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("cannot create the ring buffer for CPU {cpu}: {source}")]
    Ring {
        cpu: u32,
        #[source]
        source: Box<MapError>,
    },
    #[error("the embedded BPF object lacks {0}: rebuild it with `cargo xtask build`")]
    MissingObject(&'static str),
    #[error("this mirror was built without its eBPF object: build it with `cargo xtask build`")]
    NoObject,
    #[error("cannot list this machine's CPUs ({path}): {source}")]
    Cpus {
        path: &'static str,
        #[source]
        source: io::Error,
    },
}

/// One CPU's ring, ready to be drained.
pub struct CpuRing {
    pub cpu: u32,
    pub ring: RingBuf<MapData>,
    /// Bytes of the ring's data area.
    pub size: u32,
}

/// The loaded kernel side of the mirror.
pub struct Mirror {
    ebpf: Ebpf,
    ports: Array<MapData, u8>,
    counters: Arc<KernelCounters>,
    rings: Vec<CpuRing>,
    ring_fills: Arc<RingFills>,
    lost_flows: Option<LostFlows>,
    kernel_log: Option<EbpfLogger<&'static dyn log::Log>>,
}

impl Mirror {
    /// Loads the object, creates one ring per online CPU and inserts it in
    /// the ring array. The programs themselves are loaded on first use.
    pub fn load(options: &LoadOptions) -> Result<Self, LoadError> {
        if EBPF_OBJECT.is_empty() {
            return Err(LoadError::NoObject);
        }
        check_kernel_features()?;
        let cpus =
            aya::util::online_cpus().map_err(|(path, source)| LoadError::Cpus { path, source })?;
        // The ring array is indexed by CPU id, so it spans the highest id.
        let ring_slots = cpus.iter().max().map_or(1, |max| max + 1).min(MAX_CPUS);
        // All 0: the programs do not look.
        let netns = options.netns_path.unwrap_or(NetnsPath {
            skb_dev: 0,
            xdp_rxq: 0,
            rxq_dev: 0,
            dev_net: 0,
            net_cookie: 0,
        });

        let mut ebpf = EbpfLoader::new()
            .override_global(GLOBAL_SNAPLEN, &options.snaplen, true)
            .override_global(aya_log::LEVEL, &options.kernel_log_level, false)
            .override_global(GLOBAL_WAKEUP_BYTES, &wakeup_bytes(options.ring_size), true)
            .override_global(
                GLOBAL_SAMPLE_PERCENT,
                &u32::from(options.sample.percent.clamp(1, 100)),
                true,
            )
            .override_global(GLOBAL_SAMPLE_SEED, &options.sample.seed, true)
            .override_global(GLOBAL_NETNS_SKB_DEV, &netns.skb_dev, true)
            .override_global(GLOBAL_NETNS_XDP_RXQ, &netns.xdp_rxq, true)
            .override_global(GLOBAL_NETNS_RXQ_DEV, &netns.rxq_dev, true)
            .override_global(GLOBAL_NETNS_DEV_NET, &netns.dev_net, true)
            .override_global(GLOBAL_NETNS_NET_COOKIE, &netns.net_cookie, true)
            .map_max_entries(MAP_RINGS, ring_slots)
            .load(EBPF_OBJECT)
            .map_err(classify_ebpf_error)?;

        // Must outlive program loading: the programs refer to its map.
        let kernel_log = ebpf
            .map(AYA_LOG_MAP)
            .is_some()
            .then(|| EbpfLogger::init(&mut ebpf))
            .transpose()
            .unwrap_or_else(|error| {
                tracing::warn!("kernel log records are unavailable: {error}");
                None
            });

        let ports = take_map(&mut ebpf, MAP_PORTS)?;
        let counters = Arc::new(KernelCounters::new(take_map(&mut ebpf, MAP_COUNTERS)?));
        let lost_flows = Some(LostFlows {
            map: take_map(&mut ebpf, MAP_LOST_FLOWS)?,
        });
        let rings = {
            let mut ring_array: ArrayOfMaps<&mut MapData, MapData> = ebpf
                .map_mut(MAP_RINGS)
                .ok_or(LoadError::MissingObject(MAP_RINGS))?
                .try_into()
                .map_err(|_| LoadError::MissingObject(MAP_RINGS))?;
            cpus.iter()
                .filter(|cpu| **cpu < ring_slots)
                .map(|&cpu| create_ring(&mut ring_array, cpu, options.ring_size))
                .collect::<Result<Vec<_>, _>>()?
        };

        let ring_fills = rings
            .iter()
            .filter_map(|ring| {
                RingFill::new(ring.cpu, &ring.ring, options.ring_size)
                    .inspect_err(|error| {
                        tracing::warn!(
                            "the fill of CPU {}'s ring cannot be read: {error}",
                            ring.cpu
                        );
                    })
                    .ok()
            })
            .collect();
        Ok(Self {
            ebpf,
            ports,
            counters,
            rings,
            ring_fills: Arc::new(RingFills(ring_fills)),
            lost_flows,
            kernel_log,
        })
    }

    /// The XDP entry point, loaded into the kernel.
    pub fn xdp(&mut self) -> Result<&mut Xdp, LoadError> {
        let program: &mut Xdp = self.program(ProgramKind::Xdp)?;
        Ok(program)
    }

    /// The TC ingress entry point, loaded into the kernel.
    pub fn tc(&mut self) -> Result<&mut SchedClassifier, LoadError> {
        let program: &mut SchedClassifier = self.program(ProgramKind::Tc)?;
        Ok(program)
    }

    /// The TC egress entry point, loaded into the kernel.
    pub fn tc_egress(&mut self) -> Result<&mut SchedClassifier, LoadError> {
        let program: &mut SchedClassifier = self.program(ProgramKind::TcEgress)?;
        Ok(program)
    }

    fn program<'a, P>(&'a mut self, kind: ProgramKind) -> Result<&'a mut P, LoadError>
    where
        &'a mut P: TryFrom<&'a mut aya::programs::Program>,
        P: LoadableProgram + 'a,
    {
        let name = kind.name();
        let program: &mut P = self
            .ebpf
            .program_mut(name)
            .ok_or(LoadError::MissingObject(name))?
            .try_into()
            .map_err(|_| LoadError::MissingObject(name))?;
        if !program.is_loaded() {
            program
                .load_program()
                .map_err(|error| classify_program_error(name, error))?;
        }
        Ok(program)
    }

    /// Starts or stops mirroring TCP packets to `port`.
    pub fn set_port(&mut self, port: u16, mirrored: bool) -> Result<(), MapError> {
        self.ports.set(u32::from(port), u8::from(mirrored), 0)
    }

    /// Ports currently mirrored, ascending.
    pub fn ports(&self) -> Result<Vec<u16>, MapError> {
        let mut ports = Vec::new();
        for (port, value) in self.ports.iter().enumerate() {
            if value? != 0 {
                ports.push(port as u16);
            }
        }
        Ok(ports)
    }

    /// Sum over CPUs of the kernel's counters.
    pub fn counters(&self) -> Result<KernelSnapshot, MapError> {
        self.counters.read()
    }

    /// How full each ring is, for the registry.
    pub fn ring_fills(&self) -> Arc<RingFills> {
        Arc::clone(&self.ring_fills)
    }

    /// The counters, for the registry.
    pub fn kernel_counters(&self) -> Arc<KernelCounters> {
        Arc::clone(&self.counters)
    }

    /// Hands the rings to their drain tasks (once).
    pub fn take_rings(&mut self) -> Vec<CpuRing> {
        std::mem::take(&mut self.rings)
    }

    /// Hands the map of flows that lost packets to a full ring to its
    /// reader (once).
    pub fn take_lost_flows(&mut self) -> Option<LostFlows> {
        self.lost_flows.take()
    }

    /// Hands the kernel log ring to its drain task (once).
    pub fn take_kernel_log(&mut self) -> Option<EbpfLogger<&'static dyn log::Log>> {
        self.kernel_log.take()
    }
}

/// Memory all rings take together by default (`tcpdump -B 65536` takes 64
/// MiB for its one buffer).
pub const DEFAULT_RING_BUDGET: u64 = 128 << 20;
const MIN_DEFAULT_RING: u64 = 4 << 20;
const MAX_DEFAULT_RING: u64 = 64 << 20;

/// Default size of each CPU's ring: the budget shared by the online CPUs,
/// as a power of two between 4 and 64 MiB. Measured on a busy 2-core veth
/// setup: 1 MiB rings lost 40 % of records while the drain task waited for
/// a CPU, 16 MiB lost 0.02 %, 64 MiB none; larger rings cost about 10 %
/// more per packet (less of the ring stays in cache).
pub fn default_ring_size() -> u32 {
    ring_size_for_cpus(aya::util::online_cpus().map_or(1, |cpus| cpus.len()) as u64)
}

fn ring_size_for_cpus(cpus: u64) -> u32 {
    let share = DEFAULT_RING_BUDGET / cpus.max(1);
    let power = if share.is_power_of_two() {
        share
    } else {
        share.next_power_of_two() / 2
    };
    power.clamp(MIN_DEFAULT_RING, MAX_DEFAULT_RING) as u32
}

/// Unread bytes at which a ring wakes its reader: an eighth of the ring,
/// at most 1 MiB. Waking on every record cost the drain 4x the CPU per GB
/// (0.15 vs 0.04 CPU-seconds) at 8 Gbit/s; the reader also polls every
/// few milliseconds, which bounds the delay of a trickle below the mark.
fn wakeup_bytes(ring_size: u32) -> u64 {
    (u64::from(ring_size) / 8).min(1 << 20)
}

/// Flows whose packets a full ring could not take.
pub struct LostFlows {
    map: aya::maps::HashMap<MapData, LostFlow, u64>,
}

impl LostFlows {
    /// Takes every flow out of the map, as its client-to-server tuple
    /// whichever direction lost a packet (the kernel keys an answer's loss
    /// that way): the connection closes as `gap` either way.
    pub fn take(&mut self) -> Vec<FlowKey> {
        let keys: Vec<LostFlow> = self.map.keys().filter_map(Result::ok).collect();
        keys.iter()
            .filter_map(|key| {
                // Gone already (LRU) is as good as taken.
                let _ = self.map.remove(key);
                flow_key(key)
            })
            .collect()
    }
}

fn flow_key(lost: &LostFlow) -> Option<FlowKey> {
    let ip = |bytes: [u8; 16]| -> Option<IpAddr> {
        match lost.ip_version {
            4 => Some(IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])),
            6 => Some(IpAddr::from(bytes)),
            _ => None,
        }
    };
    Some(FlowKey {
        src: SocketAddr::new(ip(lost.src_addr)?, lost.src_port),
        dst: SocketAddr::new(ip(lost.dst_addr)?, lost.dst_port),
    })
}

/// Loading common to both program types (aya has no trait for it).
pub trait LoadableProgram {
    fn is_loaded(&self) -> bool;
    fn load_program(&mut self) -> Result<(), ProgramError>;
}

impl LoadableProgram for Xdp {
    fn is_loaded(&self) -> bool {
        self.fd().is_ok()
    }
    fn load_program(&mut self) -> Result<(), ProgramError> {
        self.load()
    }
}

impl LoadableProgram for SchedClassifier {
    fn is_loaded(&self) -> bool {
        self.fd().is_ok()
    }
    fn load_program(&mut self) -> Result<(), ProgramError> {
        self.load()
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<Map>,
{
    let map = ebpf.take_map(name).ok_or(LoadError::MissingObject(name))?;
    T::try_from(map).map_err(|_| LoadError::MissingObject(name))
}

fn create_ring(
    ring_array: &mut ArrayOfMaps<&mut MapData, MapData>,
    cpu: u32,
    size: u32,
) -> Result<CpuRing, LoadError> {
    let ring_error = |source: MapError| LoadError::Ring {
        cpu,
        source: Box::new(source),
    };
    let definition = aya_obj::Map::new_from_params(
        aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_RINGBUF as u32,
        0,
        0,
        size,
        0,
    );
    let data = MapData::create(definition, &format!("mirror_ring{cpu}"), None).map_err(
        |error| match error {
            MapError::CreateError { io_error, .. }
                if io_error.kind() == io::ErrorKind::PermissionDenied =>
            {
                LoadError::PermissionDenied
            }
            other => ring_error(other),
        },
    )?;
    ring_array.set(cpu, &data, 0).map_err(ring_error)?;
    let ring = RingBuf::try_from(Map::RingBuf(data)).map_err(ring_error)?;
    Ok(CpuRing { cpu, ring, size })
}

fn check_kernel_features() -> Result<(), LoadError> {
    let supported = |map_type| aya::sys::is_map_supported(map_type).unwrap_or(false);
    if !supported(MapType::RingBuf) {
        return Err(LoadError::KernelFeature {
            feature: "ring buffers",
            version: "5.8",
        });
    }
    if !supported(MapType::ArrayOfMaps) {
        return Err(LoadError::KernelFeature {
            feature: "map-in-map arrays",
            version: "5.8",
        });
    }
    Ok(())
}

/// EPERM is the kernel's "not privileged"; EACCES from a program load is
/// the verifier rejecting the program, a different error altogether.
fn is_permission_denied(error: &io::Error) -> bool {
    error.raw_os_error() == Some(libc::EPERM)
}

fn classify_ebpf_error(error: EbpfError) -> LoadError {
    let denied = match &error {
        EbpfError::MapError(MapError::CreateError { io_error, .. }) => {
            is_permission_denied(io_error)
        }
        EbpfError::BtfError(aya::BtfError::LoadError { io_error, .. }) => {
            is_permission_denied(io_error)
        }
        _ => false,
    };
    if denied {
        LoadError::PermissionDenied
    } else {
        LoadError::Ebpf(Box::new(error))
    }
}

fn classify_program_error(name: &'static str, error: ProgramError) -> LoadError {
    if let ProgramError::LoadError {
        io_error,
        verifier_log,
    } = &error
    {
        if is_permission_denied(io_error) {
            return LoadError::PermissionDenied;
        }
        if io_error.raw_os_error() == Some(libc::EACCES) {
            let log = verifier_log.to_string();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(20)..].join("\n");
            return LoadError::Verifier {
                name,
                log_tail: tail,
            };
        }
    }
    LoadError::Program {
        name,
        source: Box::new(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_rings_share_the_budget_within_bounds() {
        assert_eq!(ring_size_for_cpus(0), 64 << 20);
        assert_eq!(ring_size_for_cpus(2), 64 << 20);
        assert_eq!(ring_size_for_cpus(3), 32 << 20);
        assert_eq!(ring_size_for_cpus(8), 16 << 20);
        assert_eq!(ring_size_for_cpus(256), 4 << 20);
        for cpus in 1..300 {
            assert!(ring_size_for_cpus(cpus).is_power_of_two(), "{cpus}");
        }
    }

    #[test]
    fn lost_flow_keys_become_socket_addresses() {
        let mut lost = LostFlow {
            src_port: 40000,
            dst_port: 80,
            ip_version: 4,
            ..LostFlow::default()
        };
        lost.src_addr[..4].copy_from_slice(&[198, 18, 0, 1]);
        lost.dst_addr[..4].copy_from_slice(&[198, 18, 0, 2]);
        let flow = flow_key(&lost).unwrap();
        assert_eq!(flow.src, "198.18.0.1:40000".parse().unwrap());
        assert_eq!(flow.dst, "198.18.0.2:80".parse().unwrap());
        lost.ip_version = 6;
        assert!(flow_key(&lost).unwrap().src.is_ipv6());
        lost.ip_version = 5;
        assert_eq!(flow_key(&lost), None);
    }

    #[test]
    fn wakeup_mark_is_an_eighth_of_the_ring_up_to_a_mebibyte() {
        assert_eq!(wakeup_bytes(4096), 512);
        assert_eq!(wakeup_bytes(4 << 20), 512 << 10);
        assert_eq!(wakeup_bytes(64 << 20), 1 << 20);
    }
}
