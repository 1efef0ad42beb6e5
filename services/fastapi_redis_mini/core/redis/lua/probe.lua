-- Write a short-lived probe key, to learn whether a partition takes writes now: a server that
-- is out of memory, read-only or unable to persist still answers PING, but refuses this.
-- KEYS: probe
-- ARGV: milliseconds the key lives
-- Returns 'OK'
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
return 'OK'
