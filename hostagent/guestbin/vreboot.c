/*
 * vreboot, vhalt: ask the host to restart or stop this guest.
 *
 *     vreboot [--socket PATH]     sends "reboot\n"
 *     vhalt   [--socket PATH]     sends "halt\n" (vhalt is a link to vreboot)
 *
 * The seed's client (util-vserver src/vreboot.c) and its protocol: connect to
 * the guest's reboot socket (default /dev/reboot), write one line, close. The
 * host knows the guest by the socket, so the line names no guest. Built
 * static by vpanel (hostagent/guestbin) and installed as /sbin/vreboot in
 * every guest it builds, so that guests without Python or util-vserver have it.
 * Exit status 0 when the request was handed over, 1 otherwise.
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static const char *prog = "vreboot";

static void usage(FILE *out)
{
	fprintf(out, "usage: %s [--socket PATH]\n"
		"Ask the host to %s this vserver, through PATH (default /dev/reboot).\n",
		prog, strcmp(prog, "vhalt") == 0 ? "stop" : "restart");
}

int main(int argc, char **argv)
{
	const char *path = "/dev/reboot";
	const char *msg = "reboot\n";
	struct sockaddr_un addr;
	size_t left;
	int fd, i;

	if (argc > 0 && argv[0] != NULL && argv[0][0] != '\0') {
		const char *slash = strrchr(argv[0], '/');
		prog = slash != NULL ? slash + 1 : argv[0];
	}
	if (strcmp(prog, "vhalt") == 0)
		msg = "halt\n";

	for (i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--socket") == 0 && i + 1 < argc) {
			path = argv[++i];
		} else if (strncmp(argv[i], "--socket=", 9) == 0) {
			path = argv[i] + 9;
		} else if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
			usage(stdout);
			return 0;
		} else {
			fprintf(stderr, "%s: unexpected argument '%s'\n", prog, argv[i]);
			usage(stderr);
			return 1;
		}
	}

	memset(&addr, 0, sizeof(addr));
	addr.sun_family = AF_UNIX;
	if (path[0] == '\0' || strlen(path) >= sizeof(addr.sun_path)) {
		fprintf(stderr, "%s: socket path '%s' is empty or too long\n", prog, path);
		return 1;
	}
	strcpy(addr.sun_path, path);

	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		fprintf(stderr, "%s: socket: %s\n", prog, strerror(errno));
		return 1;
	}
	if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		int err = errno;

		if (err == ECONNREFUSED)
			fprintf(stderr, "%s: nobody is listening on %s: the host's vpanel agent "
				"is not running, so the request cannot be made now "
				"('reboot -f' or 'halt -f' end the guest without it)\n", prog, path);
		else if (err == ENOENT)
			fprintf(stderr, "%s: %s does not exist: this vserver has no reboot "
				"manager socket\n", prog, path);
		else if (err == EACCES || err == EPERM)
			fprintf(stderr, "%s: %s: %s (only root in the vserver may do this)\n",
				prog, path, strerror(err));
		else
			fprintf(stderr, "%s: cannot connect to %s: %s\n", prog, path, strerror(err));
		close(fd);
		return 1;
	}
	for (left = strlen(msg); left > 0;) {
		/* MSG_NOSIGNAL: a manager that has gone away is an error, not SIGPIPE. */
		ssize_t n = send(fd, msg + (strlen(msg) - left), left, MSG_NOSIGNAL);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			fprintf(stderr, "%s: cannot write to %s: %s\n", prog, path, strerror(errno));
			close(fd);
			return 1;
		}
		left -= (size_t)n;
	}
	if (close(fd) < 0) {
		fprintf(stderr, "%s: close: %s\n", prog, strerror(errno));
		return 1;
	}
	return 0;
}
