# A Redis Sentinel of compose.cluster.yaml, run by the ebb-redis image's
# busybox sh (only shell builtins: the image has no other tools). On its
# first start it writes its config into its own volume, with the
# replication login from ebb-credentials; later starts keep that file,
# which Sentinel rewrites with what it learned (the current master, the
# other Sentinels, the epoch), so a restarted Sentinel rejoins as it left.
#
# EBB_SENTINEL_IP: this Sentinel's address, announced to the others.
# EBB_REDIS_MASTER: the address of the data node that is master on the
# first start. Addresses, not host names: a Sentinel resolves names in its
# event loop, and stalled on the name of a dead node.
# A master is down after 5 s without an answer; two of three Sentinels
# must agree before a replica is promoted.
set -eu
umask 077
conf=/data/sentinel.conf
if [ ! -f "$conf" ]; then
  read -r password </etc/redis/credentials/replication-password
  printf '%s\n' \
    "port 26379" \
    "sentinel announce-ip ${EBB_SENTINEL_IP}" \
    "sentinel monitor ebb ${EBB_REDIS_MASTER} 6379 2" \
    "sentinel auth-user ebb ebb-replication" \
    "sentinel auth-pass ebb ${password}" \
    "sentinel down-after-milliseconds ebb 5000" \
    "sentinel failover-timeout ebb 30000" >"$conf"
fi
exec /bin/redis-server "$conf" --sentinel
