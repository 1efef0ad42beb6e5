-- Drop the turns of API keys that have nothing left waiting in a lane, so that the lane-turns
-- hash holds a field per key with work queued rather than one per key ever seen.
-- A key's field only matters while it is past the lane's last turn taken: a submit scores its
-- task one past the later of the two (submit.lua), and once the lane has taken the key's last
-- turn the key's field is the lower one, so a missing field gives the same turn. Dropping it
-- therefore changes no task's place. Fields are visited with HSCAN, at most BUDGET a call;
-- the cursor is kept in the hash, so successive calls sweep all of it.
-- KEYS: lane_turns
-- ARGV: budget (fields looked at per call, at least)
-- Returns: the number of fields removed
local turns, budget = KEYS[1], tonumber(ARGV[1])
local state = redis.call('HMGET', turns, 'lane:1', 'lane:2', 'lane:3', 'trim-cursor')
local cursor = state[4] or '0'
local removed, seen = 0, 0
repeat
  local reply = redis.call('HSCAN', turns, cursor, 'COUNT', 100)
  cursor = reply[1]
  local fields, dead = reply[2], {}
  for j = 1, #fields, 2 do
    local lane = tonumber(string.match(fields[j], '^key:(%d):'))
    if lane and tonumber(fields[j + 1]) <= (tonumber(state[lane]) or 0) then
      dead[#dead + 1] = fields[j]
    end
  end
  if #dead > 0 then
    removed = removed + redis.call('HDEL', turns, unpack(dead))
  end
  seen = seen + #fields / 2
until cursor == '0' or seen >= budget
if cursor ~= '0' then
  redis.call('HSET', turns, 'trim-cursor', cursor)
elseif state[4] then
  redis.call('HDEL', turns, 'trim-cursor')
end
return removed
