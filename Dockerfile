# Pipes on scratch: one static binary, nothing else.
#
# Build the binary first (no registry or base image needed; OpenSSL's static
# libraries come from Debian's libssl-dev, see .cargo/config.toml):
#   scripts/build-image            # or by hand (static: .cargo/config.toml):
#   cargo build --release && DOCKER_BUILDKIT=0 docker build -t pipes .
#
# Run (or let scripts/run do it):
#   docker run -d -p 127.0.0.1:8080:8080 -v /var/run/docker.sock:/var/run/docker.sock \
#     -v "$PWD/configs:/configs" -e PIPES_ALLOW='alice/*' pipes
FROM scratch
ARG BINARY=target/x86_64-unknown-linux-gnu/release/pipes
COPY ${BINARY} /pipes
COPY conf/pipes.yaml /etc/pipes/pipes.yaml
ENV PIPES_CONFIG_DIR=/configs \
    PIPES_LISTEN=0.0.0.0:8080 \
    PIPES_SERVER_CONF=/etc/pipes/pipes.yaml
VOLUME /configs
EXPOSE 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["/pipes"]
