/* Accepts COUNT connections on an ephemeral 127.0.0.1 port through io_uring
 * (IORING_OP_ACCEPT), never through accept(2)/accept4(2). Prints the port,
 * then "accepted FD" per connection, then keeps them open until stdin closes.
 * Used by tests/accept_sources.rs: only the inet_csk_accept sources see these. */
#include <arpa/inet.h>
#include <liburing.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s COUNT\n", argv[0]);
        return 2;
    }
    int count = atoi(argv[1]);
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof addr;
    if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof addr) ||
        listen(listener, 16) || getsockname(listener, (struct sockaddr *)&addr, &len)) {
        perror("listen");
        return 1;
    }
    printf("%d\n", ntohs(addr.sin_port));
    fflush(stdout);
    struct io_uring ring;
    int err = io_uring_queue_init(8, &ring, 0);
    if (err) {
        fprintf(stderr, "io_uring_queue_init: %s\n", strerror(-err));
        return 1;
    }
    for (int i = 0; i < count; i++) {
        struct io_uring_sqe *sqe = io_uring_get_sqe(&ring);
        io_uring_prep_accept(sqe, listener, NULL, NULL, 0);
        io_uring_submit(&ring);
        struct io_uring_cqe *cqe;
        err = io_uring_wait_cqe(&ring, &cqe);
        if (err || cqe->res < 0) {
            fprintf(stderr, "io_uring accept: %s\n", strerror(err ? -err : -cqe->res));
            return 1;
        }
        printf("accepted %d\n", cqe->res);
        fflush(stdout);
        io_uring_cqe_seen(&ring, cqe);
    }
    char byte;
    while (read(0, &byte, 1) > 0) {
    }
    return 0;
}
