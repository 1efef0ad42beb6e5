-- Forget consumers that hold no pending entries: this one when it leaves, and any other that
-- has been idle for longer than the threshold (a worker that died after finishing its work).
-- A consumer with pending entries is kept, since deleting it would strand them.
-- A stream without the group (made again by a submit after a restart without persistence,
-- before any read made the group) has no consumer to forget.
-- KEYS: stream
-- ARGV: group, consumer (may be empty), idle_ms
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local consumers = redis.pcall('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if consumers.err then
  if string.sub(consumers.err, 1, 7) ~= 'NOGROUP' then
    return consumers
  end
  return 0
end
local removed = 0
for _, c in ipairs(consumers) do
  local info = {}
  for j = 1, #c, 2 do
    info[c[j]] = c[j + 1]
  end
  if info['pending'] == 0 and (info['name'] == ARGV[2] or info['idle'] > tonumber(ARGV[3])) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    removed = removed + 1
  end
end
return removed
