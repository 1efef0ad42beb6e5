-- Append the tasks whose retry backoff has run out to the stream again. An entry whose task
-- is gone (expired) or no longer PENDING (cancelled while it waited) is only dropped, so the
-- retry set holds no more than the tasks waiting out a backoff.
-- The set holds delayed starts too (submit.lua), promoted alike when due.
-- KEYS: retries, stream, task_1 .. task_n
-- ARGV: now, work_channel ("" when no worker waits on it), publish command,
--       task_id_1 .. task_id_n (read from the retry set just before, due by then)
-- Returns the number of tasks appended to the stream.
local retries, stream, now = KEYS[1], KEYS[2], tonumber(ARGV[1])
local work_channel, publish = ARGV[2], ARGV[3]
local appended = 0
for i = 4, #ARGV do
  local task_id = ARGV[i]
  local due = tonumber(redis.call('ZSCORE', retries, task_id))
  -- Gone from the set, or due later (retried again meanwhile): another call's, or not yet.
  if due and due <= now then
    redis.call('ZREM', retries, task_id)
    if redis.call('HGET', KEYS[i - 1], 'status') == 'PENDING' then
      redis.call('XADD', stream, '*', 'task_id', task_id)
      appended = appended + 1
    end
  end
end
if appended > 0 and work_channel ~= '' then
  redis.call(publish, work_channel, appended)
end
return appended
