"""Drives redis-py's cluster client (RedisCluster) for integration/tests/cluster_clients.rs.

Usage: redis_py_cluster.py PORT. The client starts from that one node. The test sends one request
per line on stdin and reads one answer per line on stdout:
  primaries        -> the ports of the masters in the client's map
  set FROM TO      -> sets key:i to i for FROM <= i < TO, then "ok"
  get KEY          -> the value, or "nil"
  replica-get FROM TO -> reads key:i for FROM <= i < TO with a second client that also reads
                      from replicas (read_from_replicas), then "ok" if each is i
Any failure answers "error <what>" instead.
"""
import sys

from redis.cluster import RedisCluster


def answer(client, replica_client, words):
    if words == ["primaries"]:
        return " ".join(str(node.port) for node in client.get_primaries())
    if len(words) == 3 and words[0] == "set":
        for i in range(int(words[1]), int(words[2])):
            client.set(f"key:{i}", i)
        return "ok"
    if len(words) == 2 and words[0] == "get":
        value = client.get(words[1])
        return "nil" if value is None else value.decode()
    if len(words) == 3 and words[0] == "replica-get":
        for i in range(int(words[1]), int(words[2])):
            value = replica_client.get(f"key:{i}")
            if value != str(i).encode():
                return f"error key:{i} is {value!r}"
        return "ok"
    return f"error unknown request {words}"


def main():
    client = RedisCluster(host="127.0.0.1", port=int(sys.argv[1]))
    replica_client = RedisCluster(host="127.0.0.1", port=int(sys.argv[1]), read_from_replicas=True)
    print("ready", flush=True)
    for line in sys.stdin:
        try:
            reply = answer(client, replica_client, line.split())
        except Exception as e:  # the test shows what went wrong
            reply = f"error {type(e).__name__}: {e}"
        print(reply, flush=True)


if __name__ == "__main__":
    main()
