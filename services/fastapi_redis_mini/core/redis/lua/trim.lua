-- Drop stream entries that every consumer group has both received and acknowledged.
-- Only entries older than each group's last-delivered id and its oldest pending entry go,
-- so consumer-group lag stays defined and no unfinished work is removed.
-- KEYS: stream
-- Returns the number of entries removed.
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function older(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end

if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local floor = nil
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for j = 1, #g, 2 do
    info[g[j]] = g[j + 1]
  end
  local candidate = info['last-delivered-id']
  local summary = redis.call('XPENDING', KEYS[1], info['name'])
  if summary[1] > 0 and older(summary[2], candidate) then
    candidate = summary[2]
  end
  if floor == nil or older(candidate, floor) then
    floor = candidate
  end
end
if floor == nil or floor == '0-0' then
  return 0
end
-- LIMIT 0 lifts the default cap of 100 macro nodes per call, which lets a busy stream outgrow
-- a trim every few seconds; removing whole nodes stays cheap.
return redis.call('XTRIM', KEYS[1], 'MINID', '~', floor, 'LIMIT', 0)
