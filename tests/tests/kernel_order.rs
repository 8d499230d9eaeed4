//! Short connections, whose few packets the kernel spreads over the CPUs'
//! rings as the client moves between CPUs: the drain merges the rings in
//! kernel-timestamp order, so that no FIN reaches the shards before its
//! SYN, and every connection ends by its FIN (or the client's RST), in
//! every attach mode. Before the merge, native XDP closed hundreds of such
//! connections as `gap`, `idle` or `shutdown` in a few seconds.

use mirror_tests::{
    bed::TestBed,
    mirror_process::MirrorProcess,
    netns::{in_ns, run_ok, wait_server_connections_ended},
    root_tests,
    web::Nginx,
};

/// wrk's connections at once: each sends one request and closes.
const CONNECTIONS: u64 = 8;

fn short_connections_end_by_fin(attach: &str) {
    let bed = TestBed::new();
    let nginx = Nginx::start(&bed.server, bed.server_ip, &bed.path("nginx"));
    let mirror = bed.mirror(80, &["--attach", attach], MirrorProcess::start_quiet);
    let url = format!("http://{}/", bed.server_ip);
    run_ok(in_ns(&bed.client, "wrk").args([
        "-t2",
        "-c8",
        "-d3s",
        "--timeout",
        "2s",
        "-H",
        "Connection: close",
        &url,
    ]));
    wait_server_connections_ended(&bed.server, 80);
    let served = nginx.requests().len() as u64;
    let output = mirror.stop();

    let counter = |name: &str| output.counter(name);
    assert!(served > 100, "wrk made few connections: {served}\n{output}");
    // Nothing was lost on the way: every close must be the connection's own.
    output.assert_counters(&[("kernel.ring_full", 0), ("shards.queue_drops", 0)]);
    let opened = counter("connections.opened");
    // Connections in flight when wrk stopped may not be in nginx's log
    // (wrk runs its connections in two threads and reconnects at once).
    assert!(
        (served..=served + 2 * CONNECTIONS).contains(&opened),
        "{opened} connections for {served} requests\n{output}"
    );
    assert_eq!(
        counter("connections.closed.fin") + counter("connections.closed.rst"),
        opened,
        "every connection ended by its FIN or RST\n{output}"
    );
    // No data segment overtook its SYN on the way to the shards.
    output.assert_counters(&[("connections.midstream", 0)]);
}

root_tests! {
    veth_tc => short_connections_end_by_fin("tc");
    veth_xdp_native => short_connections_end_by_fin("xdp-drv");
    veth_xdp_generic => short_connections_end_by_fin("xdp-skb");
}
