/*
 * Two Crank Mesh instances in one process, each on a TUN device this
 * program opens itself, as a mobile VPN extension does: both join the
 * coordinator, the program configures each TUN as the host would (the
 * instance's overlay address, a route to the peer), and each instance
 * pings a peer device through its own TUN. Logs arrive through each
 * instance's own callback.
 *
 *   two_instances COORDINATOR_URL AUTH_KEY STATE_DIR PEER_IP
 *
 * PEER_IP is the IPv4 overlay address of a device in the mesh. Prints
 * what it checked; exits 0 when every check held.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <arpa/inet.h>
#include <time.h>
#include <unistd.h>

#include "crank_mesh.h"

struct instance {
  const char *name;
  CrankMesh *mesh;
  int tun;
  struct in_addr addr;
  int logs;
};

static void on_log(void *user, int level, const char *line) {
  struct instance *in = user;
  in->logs++;
  if (level <= CRANK_MESH_LOG_WARN || getenv("CRANK_FFI_VERBOSE"))
    fprintf(stderr, "[%s] %s\n", in->name, line);
}

static int open_tun(const char *name) {
  int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
  if (fd < 0) return -1;
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
  strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
  if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
    close(fd);
    return -1;
  }
  /* Up, as the host would bring it up; addresses stay the host's business
   * (none are needed to carry the packets written here). */
  int s = socket(AF_INET, SOCK_DGRAM, 0);
  if (s >= 0) {
    if (ioctl(s, SIOCGIFFLAGS, &ifr) == 0) {
      ifr.ifr_flags |= IFF_UP;
      ioctl(s, SIOCSIFFLAGS, &ifr);
    }
    close(s);
  }
  return fd;
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The instance's own IPv4 overlay address and whether it sees `peers`
 * peers online, from its status JSON. */
static int joined(struct instance *in, int peers) {
  char *status = crank_mesh_status(in->mesh);
  if (!status) return 0;
  int ok = 0;
  const char *self = strstr(status, "\"self\":{");
  const char *addrs = self ? strstr(self, "\"addresses\":[\"") : NULL;
  if (addrs) {
    char ip[64] = {0};
    const char *start = addrs + strlen("\"addresses\":[\"");
    const char *end = strchr(start, '"');
    if (end && end - start < (long)sizeof ip) {
      memcpy(ip, start, end - start);
      ok = inet_pton(AF_INET, ip, &in->addr) == 1;
    }
  }
  int online = 0;
  for (const char *p = status; (p = strstr(p, "\"online\":true")); p++) online++;
  crank_mesh_string_free(status);
  return ok && online >= peers;
}

/* Prints an instance's status, to see why a check failed. */
static void show(struct instance *in) {
  char *status = crank_mesh_status(in->mesh);
  fprintf(stderr, "%s status: %s\n", in->name, status ? status : "(none)");
  crank_mesh_string_free(status);
}

/* Runs a shell command; its exit status. */
static int sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static int sh(const char *fmt, ...) {
  char cmd[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(cmd, sizeof cmd, fmt, ap);
  va_end(ap);
  return system(cmd);
}

/* What the host does with the instance's addresses once it knows them:
 * the overlay address on its TUN, and the peer routed through it (each
 * TUN its own metric: `ping -I TUN` picks the route through that TUN). */
static int configure(struct instance *in, const char *peer, int metric) {
  char addr[INET_ADDRSTRLEN];
  inet_ntop(AF_INET, &in->addr, addr, sizeof addr);
  return sh("ip addr add %s/32 dev %s && ip route add %s/32 dev %s metric %d", addr,
            in->name, peer, in->name, metric);
}

/* Pings `peer` through the instance's TUN until it answers (20 s at most). */
static int pings(struct instance *in, const char *peer) {
  double deadline = now() + 20;
  while (now() < deadline) {
    if (sh("ping -q -c 1 -W 1 -I %s %s >/dev/null", in->name, peer) == 0) return 1;
  }
  return 0;
}

int main(int argc, char **argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: %s COORDINATOR_URL AUTH_KEY STATE_DIR PEER_IP\n", argv[0]);
    return 2;
  }
  const char *peer = argv[4];
  struct instance ins[2] = {{.name = "ffi-a"}, {.name = "ffi-b"}};
  int failed = 0;

  /* A bad configuration is refused, with the reason logged. */
  struct instance bad = {.name = "bad"};
  if (crank_mesh_new("{\"state_dir\": 1}", on_log, &bad) != NULL || bad.logs != 1) {
    fprintf(stderr, "a bad configuration was not refused\n");
    failed = 1;
  } else {
    printf("bad configuration refused\n");
  }

  for (int i = 0; i < 2; i++) {
    struct instance *in = &ins[i];
    char config[1024];
    snprintf(config, sizeof config,
             "{\"state_dir\": \"%s/%s\", \"coordinator\": \"%s\", \"auth_key\": \"%s\","
             " \"hostname\": \"%s\", \"tun_name\": \"%s\", \"log_level\": \"info\"}",
             argv[3], in->name, argv[1], argv[2], in->name, in->name);
    in->mesh = crank_mesh_new(config, on_log, in);
    in->tun = open_tun(in->name);
    if (!in->mesh || in->tun < 0) {
      fprintf(stderr, "%s: could not create (TUN %d: %s)\n", in->name, in->tun, strerror(errno));
      return 1;
    }
    if (crank_mesh_start(in->mesh, in->tun) != 0) {
      fprintf(stderr, "%s: start: %s\n", in->name, crank_mesh_last_error(in->mesh));
      return 1;
    }
    /* A second start is refused with a reason, and the first one stands. */
    if (crank_mesh_start(in->mesh, in->tun) != -1 ||
        strstr(crank_mesh_last_error(in->mesh), "already") == NULL) {
      fprintf(stderr, "%s: a second start was not refused\n", in->name);
      failed = 1;
    }
  }

  /* Each sees the peer device and the other instance online. */
  double deadline = now() + 30;
  while (!(joined(&ins[0], 2) && joined(&ins[1], 2))) {
    if (now() > deadline) {
      fprintf(stderr, "the instances did not see their peers online within 30 s\n");
      show(&ins[0]);
      show(&ins[1]);
      return 1;
    }
    usleep(100 * 1000);
  }
  char a[INET_ADDRSTRLEN], b[INET_ADDRSTRLEN];
  inet_ntop(AF_INET, &ins[0].addr, a, sizeof a);
  inet_ntop(AF_INET, &ins[1].addr, b, sizeof b);
  printf("joined: %s and %s\n", a, b);

  for (int i = 0; i < 2; i++) {
    struct instance *in = &ins[i];
    if (configure(in, peer, 100 + i) != 0) {
      fprintf(stderr, "%s: configuring the TUN failed\n", in->name);
      return 1;
    }
    if (pings(in, peer)) {
      printf("%s: ping %s answered\n", in->name, peer);
    } else {
      fprintf(stderr, "%s: ping %s through the TUN went unanswered\n", in->name, peer);
      show(in);
      failed = 1;
    }
  }

  char *status = crank_mesh_status(ins[0].mesh);
  int running = status && strstr(status, "\"backend\":\"running\"") != NULL;
  if (!running) {
    fprintf(stderr, "a's status does not say running: %s\n", status ? status : "(none)");
    failed = 1;
  }
  crank_mesh_string_free(status);

  for (int i = 0; i < 2; i++) {
    if (ins[i].logs == 0) {
      fprintf(stderr, "%s: no log lines reached its callback\n", ins[i].name);
      failed = 1;
    }
    printf("%s: %d log lines\n", ins[i].name, ins[i].logs);
    crank_mesh_stop(ins[i].mesh);
    crank_mesh_free(ins[i].mesh);
    /* The host's descriptor is still its own after the instance is gone. */
    if (fcntl(ins[i].tun, F_GETFD) < 0) {
      fprintf(stderr, "%s: the TUN descriptor was closed by the library\n", ins[i].name);
      failed = 1;
    }
    close(ins[i].tun);
  }
  printf(failed ? "FAILED\n" : "ok\n");
  return failed;
}
