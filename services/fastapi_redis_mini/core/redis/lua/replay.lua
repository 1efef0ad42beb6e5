-- Put dead-lettered tasks back on the stream with a fresh delivery count.
-- KEYS: dead_letter, stream, task_1 .. task_n
-- ARGV: dead_entry_1 .. dead_entry_n, task_id_1 .. task_id_n
local n = #KEYS - 2
local replayed = 0
for i = 1, n do
  local entry, task_id = ARGV[i], ARGV[n + i]
  if redis.call('EXISTS', KEYS[i + 2]) == 1 then
    redis.call('HSET', KEYS[i + 2], 'status', 'PENDING', 'deliveries', '0')
    redis.call('HDEL', KEYS[i + 2], 'error', 'finished_at', 'owner', 'cancel')
    redis.call('XADD', KEYS[2], '*', 'task_id', task_id)
    replayed = replayed + 1
  end
  redis.call('XDEL', KEYS[1], entry)
end
return replayed
