-- Hand up to COUNT new entries of one partition's stream to a consumer, without blocking.
-- A script rather than XREADGROUP itself: a cluster client routes a script by the key it
-- declares, while it would first ask a node where XREADGROUP's keys are; and a group that
-- vanished (a restart without persistence) is made again in the same step.
-- KEYS: stream
-- ARGV: group, consumer, count
-- Returns: {entry_id_1, task_id_1, entry_id_2, task_id_2, ..}; an entry deleted since it was
--   added has no task and is left out
local reply = redis.pcall('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3],
  'STREAMS', KEYS[1], '>')
if type(reply) == 'table' and reply.err then
  if string.sub(reply.err, 1, 7) ~= 'NOGROUP' then
    return reply
  end
  redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
  return {}
end
local out = {}
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
return out
