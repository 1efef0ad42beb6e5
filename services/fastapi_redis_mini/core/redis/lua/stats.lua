-- Read the queue's depth and ages in one round trip, against Redis's own clock, so the ages
-- do not depend on the reader's clock. An entry id's first part is the time it was added.
-- KEYS: stream, dead_letter, retries
-- ARGV: group
-- Returns: {stream length, group found (0|1), consumers, pending, lag (-1 when undefined),
--   id of the oldest entry not yet delivered to the group or "", id of the oldest pending
--   entry or "", dead-letter length, retry set size, now in ms}
local stream, group = KEYS[1], ARGV[1]
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local length = redis.call('XLEN', stream)
local dead = redis.call('XLEN', KEYS[2])
local retries = redis.call('ZCARD', KEYS[3])

local info = nil
if redis.call('EXISTS', stream) == 1 then
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local fields = {}
    for j = 1, #g, 2 do
      fields[g[j]] = g[j + 1]
    end
    if fields['name'] == group then
      info = fields
    end
  end
end

if info == nil then
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  local oldest = first[1] and first[1][1] or ''
  return {length, 0, 0, 0, length, oldest, '', dead, retries, now_ms}
end

local after = redis.call('XRANGE', stream, '(' .. info['last-delivered-id'], '+', 'COUNT', 1)
local undelivered = after[1] and after[1][1] or ''
local summary = redis.call('XPENDING', stream, group)
local pending_oldest = summary[1] > 0 and summary[2] or ''
local lag = info['lag']
if type(lag) ~= 'number' then
  lag = -1
end
return {length, 1, info['consumers'], info['pending'], lag, undelivered, pending_oldest, dead,
        retries, now_ms}
