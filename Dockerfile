# One image for every service in compose.yaml: the project and its npm dependencies, cached at
# build time so that a container starts without network. Each service picks its script by its
# command (`deno task peer 6001 ...`); with none, the image lists the tasks.
#
#   docker compose up --build
#
# The tag pins the Deno that .ci/run installs; tests/compose_test.ts checks they agree.
FROM denoland/deno:2.9.6

# The folders the services write into, given to the image's non-root user. A named volume
# mounted on one of them starts as a copy of it, owner included, so the splitter and the peers
# can write their stores without running as root.
RUN mkdir -p /data/6001 /data/6002 /data/6003 /data/6004 && chown -R deno:deno /data

WORKDIR /app
# DENO_DIR (/deno-dir) belongs to deno too, so the cache filled below is the one it runs with.
USER deno
ENV DENO_NO_UPDATE_CHECK=1 DENO_NO_PROMPT=1

# The pinned npm packages first, in a layer that changes only with the lock file. --frozen
# fails the build, rather than resolve anew, if deno.json and deno.lock disagree.
COPY deno.json deno.lock ./
RUN deno install --frozen

# The code is root's and read-only for the services; then every entry script's module graph
# is cached, so nothing is left to fetch at run time.
COPY . .
RUN deno install --frozen --entrypoint \
  split.ts directory.ts broker.ts peer.ts peer_grpc.ts subscribe.ts notify.ts

CMD ["deno", "task"]
