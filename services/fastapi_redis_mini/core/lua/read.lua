-- Read a batch of tasks; reading a DONE one also refreshes its cached result's TTL, in the
-- same round trip. The cache key was stored in each task when it was created.
-- KEYS: task_1 .. task_n
-- ARGV: cache_ttl, field_1 .. field_m (the first field must be status)
-- Returns per task: the values of the fields, in order
local fields = {unpack(ARGV, 2)}
local out = {}
for i, key in ipairs(KEYS) do
  local values = redis.call('HMGET', key, unpack(fields))
  if values[1] == 'DONE' then
    local cache = redis.call('HGET', key, 'cache_key')
    if cache then
      redis.call('EXPIRE', cache, ARGV[1])
    end
  end
  out[i] = values
end
return out
