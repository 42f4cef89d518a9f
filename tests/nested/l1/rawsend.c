/* Runs in the L2 guest: sends malformed and random frames out of a NIC through packet
 * sockets, to show that nothing a guest sends harms the host side.
 *
 *   rawsend IFNAME COUNT SEED
 *
 * Half the frames go through a plain SOCK_RAW socket (random bytes after a random
 * Ethernet header: bad IP versions, lengths and checksums, unknown ethertypes, runts of
 * 14 bytes); the other half through a socket with PACKET_VNET_HDR, whose virtio-net
 * header is ours to write: random checksum offsets and GSO types and sizes, so what
 * reaches virtio_net (and the backend, and the host's tap) includes frames claiming
 * offloads that do not fit them. The guest's kernel refuses some of them; the count of
 * those it accepted is printed. Built statically on the host (tests/nested).
 */
#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <linux/virtio_net.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef PACKET_VNET_HDR
#define PACKET_VNET_HDR 15
#endif

static unsigned char frame[sizeof(struct virtio_net_hdr) + 65536];

static int open_socket(int ifindex, int vnet)
{
    struct sockaddr_ll address = {0};
    int s = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));

    if (s < 0) {
        perror("socket");
        exit(1);
    }
    if (vnet && setsockopt(s, SOL_PACKET, PACKET_VNET_HDR, &vnet, sizeof vnet) < 0) {
        perror("PACKET_VNET_HDR");
        exit(1);
    }
    address.sll_family = AF_PACKET;
    address.sll_protocol = htons(ETH_P_ALL);
    address.sll_ifindex = ifindex;
    if (bind(s, (struct sockaddr *)&address, sizeof address) < 0) {
        perror("bind");
        exit(1);
    }
    return s;
}

int main(int argc, char **argv)
{
    static const unsigned char gso_types[] = {
        VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_UDP,
        VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN, 0x7f};
    long count, i, sent = 0;
    int ifindex, raw, vnet;

    if (argc != 4) {
        fprintf(stderr, "usage: rawsend IFNAME COUNT SEED\n");
        return 2;
    }
    ifindex = (int)if_nametoindex(argv[1]);
    if (!ifindex) {
        perror(argv[1]);
        return 1;
    }
    count = atol(argv[2]);
    srandom((unsigned)atol(argv[3]));
    raw = open_socket(ifindex, 0);
    vnet = open_socket(ifindex, 1);
    for (i = 0; i < count; i++) {
        size_t len = 14 + (size_t)(random() % 1501);
        size_t j;
        ssize_t n;

        for (j = 0; j < sizeof frame; j += 4) {
            long r = random();
            memcpy(frame + j, &r, 4);
        }
        if (i % 2 == 0) {
            if (i % 8 == 0)
                memcpy(frame + 12, "\x08\x00", 2);       /* claims IPv4 */
            n = send(raw, frame, len, 0);
        } else {
            struct virtio_net_hdr *h = (struct virtio_net_hdr *)frame;
            size_t big = 14 + (size_t)(random() % 65000);

            h->flags = random() % 4;                    /* NEEDS_CSUM, DATA_VALID, ... */
            h->gso_type = gso_types[random() % sizeof gso_types];
            h->hdr_len = random() % 200;
            h->gso_size = random() % 3000;
            h->csum_start = random() % 1600;
            h->csum_offset = random() % 40;
            if (h->gso_type == VIRTIO_NET_HDR_GSO_NONE)
                big = len;
            n = send(vnet, frame, sizeof *h + big, 0);
        }
        if (n > 0)
            sent++;
    }
    printf("rawsend: %ld of %ld frames accepted by the guest's kernel\n", sent, count);
    return 0;
}
