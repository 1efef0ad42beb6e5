-- Hand up to COUNT tasks to a consumer when tasks wait in priority lanes: first the entries
-- already in the stream (retries and delayed tasks that came due, entries written before
-- lanes were on), then tasks taken from the lanes, appended to the stream and read at once,
-- so each is in this consumer's pending list like any delivery and reclaimed if it dies.
-- The highest lane with work goes first, except on every GUARD-th task taken, which goes to a
-- lower lane with work (normal and low in turn): under a steady high load, low still moves.
-- Within a lane, tasks leave in turn order (see submit.lua), so API keys take turns.
-- Without blocking; a group that vanished is made again, as read_group.lua does.
-- KEYS: stream, lane_turns, lane_high, lane_normal, lane_low
-- ARGV: group, consumer, count, guard
-- Returns: {entry_id_1, task_id_1, entry_id_2, task_id_2, ..}
local stream, lane_turns = KEYS[1], KEYS[2]
local group, consumer = ARGV[1], ARGV[2]
local count, guard = tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {}

local function read(n)
  local reply = redis.pcall('XREADGROUP', 'GROUP', group, consumer, 'COUNT', n,
    'STREAMS', stream, '>')
  if type(reply) == 'table' and reply.err then
    if string.sub(reply.err, 1, 7) ~= 'NOGROUP' then
      error(reply.err)
    end
    redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
    return
  end
  if reply then
    for _, entry in ipairs(reply[1][2]) do
      local fields = entry[2]
      if fields then
        for j = 1, #fields, 2 do
          if fields[j] == 'task_id' then
            out[#out + 1] = entry[1]
            out[#out + 1] = fields[j + 1]
          end
        end
      end
    end
  end
end

read(count)
local wanted = count - #out / 2
if wanted <= 0 then
  return out
end

local state = redis.call('HMGET', lane_turns, 'taken')
local taken = tonumber(state[1]) or 0
local empty = {}
local last_turn = {}
local appended = 0

-- The lanes in the order the next task is taken from them.
local function order(turn)
  if turn % guard ~= 0 then
    return {1, 2, 3}
  end
  if (turn / guard) % 2 == 0 then
    return {3, 2, 1}
  end
  return {2, 3, 1}
end

while wanted > 0 do
  local turn = taken + 1
  -- Up to the next guarded turn, every task comes from the same lane: take them together.
  local run = turn % guard == 0 and 1 or math.min(wanted, guard - turn % guard)
  local lane = nil
  for _, candidate in ipairs(order(turn)) do
    if not empty[candidate] then
      lane = candidate
      break
    end
  end
  if not lane then
    break
  end
  local popped = redis.call('ZPOPMIN', KEYS[2 + lane], run)
  if #popped == 0 then
    empty[lane] = true
  else
    for j = 1, #popped, 2 do
      local task_id = string.match(popped[j], '^%d+:(.+)$') or popped[j]
      redis.call('XADD', stream, '*', 'task_id', task_id)
      last_turn[lane] = popped[j + 1]
      appended = appended + 1
    end
    local got = #popped / 2
    taken = taken + got
    wanted = wanted - got
    if got < run then
      empty[lane] = true
    end
  end
end

if appended > 0 then
  local fields = {'taken', taken}
  for lane, turn in pairs(last_turn) do
    fields[#fields + 1] = 'lane:' .. lane
    fields[#fields + 1] = turn
  end
  redis.call('HSET', lane_turns, unpack(fields))
  read(appended)
end
return out
