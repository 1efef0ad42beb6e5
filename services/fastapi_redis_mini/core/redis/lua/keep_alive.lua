-- Reset the idle time of the entries this consumer is running, so that no other worker
-- reclaims a task that is still being worked on. Entries another consumer has taken over
-- are left alone. Also reports which of these tasks a client asked to cancel.
-- KEYS: stream, task_1 .. task_n
-- ARGV: group, consumer, entry_1 .. entry_n
-- Returns per entry: 'ok', 'lost' or 'cancel'. A group that vanished (a restart without
-- persistence took the stream) holds no entry: each is 'lost'.
local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local out = {}
for i = 2, #KEYS do
  local entry = ARGV[i + 1]
  local pending = redis.pcall('XPENDING', stream, group, entry, entry, 1)
  if pending.err then
    if string.sub(pending.err, 1, 7) ~= 'NOGROUP' then
      return pending
    end
    pending = {}
  end
  local owner = pending[1] and pending[1][2]
  if owner ~= consumer then
    out[#out + 1] = 'lost'
  else
    redis.call('XCLAIM', stream, group, consumer, 0, entry, 'JUSTID')
    if redis.call('HGET', KEYS[i], 'cancel') == '1' then
      out[#out + 1] = 'cancel'
    else
      out[#out + 1] = 'ok'
    end
  end
end
return out
