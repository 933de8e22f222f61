# dwsfs in a container (docs/containers.md). Build from the repository root:
#   docker build -t dwsfs:0.1.0 .
# Run with /dev/fuse and CAP_SYS_ADMIN; the arguments are dwsfs's own:
#   docker run --rm --device /dev/fuse --cap-add SYS_ADMIN --security-opt apparmor=unconfined \
#     -e HF_TOKEN -v /mnt/dwsfs:/mnt/dwsfs:rshared \
#     dwsfs:0.1.0 hf://buckets/acme/grpo-run /mnt/dwsfs/model -o allow_other

# ---- builder: the README's build, with scripts/install-deps --build's packages
FROM debian:bookworm AS builder
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      meson ninja-build pkg-config gcc libfuse3-dev fuse3 libcurl4-openssl-dev \
      libzstd-dev libxxhash-dev libjansson-dev libexpat1-dev libmicrohttpd-dev libssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN meson setup build && ninja -C build && ninja -C build install

# ---- runtime: fuse3, the libraries dwsfs and dwsctl link, TLS roots, and curl
# for the on_swap recipes (share/dwsfs/recipes)
FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      fuse3 libfuse3-3 libcurl4 libzstd1 libxxhash0 libjansson4 libexpat1 libmicrohttpd12 libssl3 \
      ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*
# the prefix (/usr/local): dwsfs, dwsctl, man pages, mount helper, recipes
COPY --from=builder /usr/local /usr/local
# foreground: logs on stderr (docker logs), SIGTERM unmounts
ENTRYPOINT ["dwsfs", "-f"]
CMD ["--help"]
