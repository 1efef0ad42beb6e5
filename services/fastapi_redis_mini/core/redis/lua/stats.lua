-- Read the queue's depth and ages in one round trip, against Redis's own clock, so the ages
-- do not depend on the reader's clock. An entry id's first part is the time it was added.
-- KEYS: stream, dead_letter, retries, lane_high, lane_normal, lane_low, webhooks_due,
--   webhooks_dead
-- ARGV: group
-- Returns: a JSON object {stream_length, group_found (true|false), consumers, pending, lag
--   (-1 when undefined), oldest_undelivered (the id of the oldest entry not yet delivered to
--   the group, or ""), oldest_pending (the id of the oldest pending entry, or ""),
--   dead_letter_length, retry_size, webhooks_pending (deliveries not settled: due, backing
--   off or being attempted), webhooks_dead, lanes, now_ms} (now_ms has 13 digits, within cjson's
--   14); lanes: per lane, highest first, {depth, oldest_queued_ms} (when its oldest task
--   was queued; 0 when empty): a lane's member starts with the time it was queued (submit.lua)
local stream, group = KEYS[1], ARGV[1]
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local length = redis.call('XLEN', stream)
local dead = redis.call('XLEN', KEYS[2])
local retries = redis.call('ZCARD', KEYS[3])
local webhooks_pending = redis.call('ZCARD', KEYS[7])
local webhooks_dead = redis.call('XLEN', KEYS[8])
local lanes = {}
for i = 4, 6 do
  local depth = redis.call('ZCARD', KEYS[i])
  local queued_ms = 0
  if depth > 0 then
    -- The oldest task is the first of some API key's tasks (a key's turns rise with time),
    -- and each key's first task holds the lowest turn or the one after it: its turn was one
    -- past the lane's last turn taken, or past its key's previous task, taken since. Among
    -- equal turns members sort by their text, which starts with the time queued. So the
    -- oldest is the first member of the lowest turn or the first of the next.
    local head = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
    local next_turn = redis.call('ZRANGEBYSCORE', KEYS[i], head[2] + 1, head[2] + 1,
      'LIMIT', 0, 1)
    for _, member in ipairs({head[1], next_turn[1]}) do
      local at = tonumber(string.match(member, '^(%d+):'))
      if at and (queued_ms == 0 or at < queued_ms) then
        queued_ms = at
      end
    end
  end
  lanes[#lanes + 1] = {depth = depth, oldest_queued_ms = queued_ms}
end

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
  return cjson.encode({stream_length = length, group_found = false, consumers = 0, pending = 0,
    lag = length, oldest_undelivered = oldest, oldest_pending = '', dead_letter_length = dead,
    retry_size = retries, webhooks_pending = webhooks_pending, webhooks_dead = webhooks_dead,
    lanes = lanes, now_ms = now_ms})
end

local after = redis.call('XRANGE', stream, '(' .. info['last-delivered-id'], '+', 'COUNT', 1)
local undelivered = after[1] and after[1][1] or ''
local summary = redis.call('XPENDING', stream, group)
local pending_oldest = summary[1] > 0 and summary[2] or ''
local lag = info['lag']
if type(lag) ~= 'number' then
  lag = -1
end
return cjson.encode({stream_length = length, group_found = true, consumers = info['consumers'],
  pending = info['pending'], lag = lag, oldest_undelivered = undelivered,
  oldest_pending = pending_oldest, dead_letter_length = dead, retry_size = retries,
  webhooks_pending = webhooks_pending, webhooks_dead = webhooks_dead, lanes = lanes,
  now_ms = now_ms})
