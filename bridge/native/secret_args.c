/*
 * secret_args.so: loaded into tritonserver with LD_PRELOAD by bridge/launcher.py, so that a secret
 * argument (the --http-restricted-api / --grpc-restricted-protocol key) reaches tritonserver's
 * main() without being on its command line. Triton 2.51 reads those keys only from argv (no
 * config file, no environment variable), and /proc/<pid>/cmdline, readable by every local user,
 * shows the argument strings the kernel copied at exec.
 *
 * The launcher passes a placeholder argument (SECRET_ARG) for each secret one, and names a file
 * (mode 0600, in the launcher's private working directory) in SECRET_ARGS_FILE holding the real
 * arguments, one per line, in order. Before main() runs (glibc passes argc/argv/envp to
 * constructors), each placeholder's argv pointer is pointed at a heap copy of the real argument:
 * main() parses the real one, /proc/<pid>/cmdline still shows the placeholder. The file is then
 * removed, and both variables are taken out of the environment the model stubs inherit.
 * See docs/DEPLOY.md, "Secrets".
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SECRET_ARG "--secret-arg-from-file"

__attribute__((constructor)) static void secret_args(int argc, char **argv, char **envp) {
    (void)envp;
    const char *path = getenv("SECRET_ARGS_FILE");
    if (path == NULL || argv == NULL) {
        return;
    }
    FILE *file = fopen(path, "r");
    if (file != NULL) {
        char *line = NULL;
        size_t size = 0;
        for (int i = 1; i < argc; i++) {
            if (strcmp(argv[i], SECRET_ARG) != 0) {
                continue;
            }
            ssize_t length = getline(&line, &size, file);
            if (length <= 0) {
                break;
            }
            if (line[length - 1] == '\n') {
                line[length - 1] = '\0';
            }
            char *copy = strdup(line);
            if (copy != NULL) {
                argv[i] = copy;
            }
        }
        if (line != NULL) {
            memset(line, 0, size);
            free(line);
        }
        fclose(file);
        unlink(path);
    }
    unsetenv("SECRET_ARGS_FILE");
    unsetenv("LD_PRELOAD");
}
