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
    local left = redis.call('TTL', key)
    if cache and left > 0 then
      -- A cached result never outlives the task it names (see finish.lua).
      redis.call('EXPIRE', cache, math.min(tonumber(ARGV[1]), left))
    end
  end
  out[i] = values
end
return out
