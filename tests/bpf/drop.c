// SPDX-License-Identifier: GPL-2.0
//
// A stand-in for someone else's firewall on the interface the mirror
// watches, for the coexistence tests (tests/tests/coexistence.rs builds it
// with clang). It drops IPv4 ICMP, or with -DDROP_TCP_PORT=N IPv4 TCP to
// port N instead, and accepts everything else with TC_ACT_OK, which ends
// the TC chain: a program or filter behind it sees nothing at all.
//
// Loads as a legacy clsact filter (`tc filter add ... bpf da obj drop.o sec
// tc`) and, built with -DSECTION='"classifier"' (the section name aya knows
// for TC programs), as a TCX program named `drop`.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>

#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#ifndef SECTION
#define SECTION "tc"
#endif

SEC(SECTION)
int drop(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);

	if ((void *)(ip + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
#ifdef DROP_TCP_PORT
	if (ip->protocol == IPPROTO_TCP && ip->ihl == 5) {
		struct tcphdr *tcp = (void *)(ip + 1);

		if ((void *)(tcp + 1) <= data_end &&
		    tcp->dest == bpf_htons(DROP_TCP_PORT))
			return TC_ACT_SHOT;
	}
#else
	if (ip->protocol == IPPROTO_ICMP)
		return TC_ACT_SHOT;
#endif
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
