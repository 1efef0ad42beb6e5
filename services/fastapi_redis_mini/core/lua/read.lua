-- Read a task; reading a DONE one also refreshes its cached result's TTL, in the same round trip.
-- The cache key was stored in the task when it was created.
-- KEYS: task
-- ARGV: cache_ttl, field_1 .. field_n
local fields = {unpack(ARGV, 2)}
local values = redis.call('HMGET', KEYS[1], unpack(fields))
if values[1] == 'DONE' then
  local cache = redis.call('HGET', KEYS[1], 'cache_key')
  if cache then
    redis.call('EXPIRE', cache, ARGV[1])
  end
end
return values
