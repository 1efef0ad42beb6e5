-- Store what a running handler reported: append each report to the task's event stream and
-- keep the latest progress on the task, so GET shows it. Only the consumer that owns the run
-- may report, and only while the task is RUNNING: once it is final nothing more is appended,
-- so a reader that sees a final status and then reads the stream to its end has every report.
-- KEYS: task, task events stream
-- ARGV: consumer, events_maxlen, events_expiry, reports_channel, publish command, task_id,
--       JSON [[kind, fraction, text], ..] (kind 'progress': fraction and message;
--       kind 'output': text is the chunk)
-- Returns: 'written', or 'lost' when the task is no longer this consumer's running task
local t = redis.call('HMGET', KEYS[1], 'status', 'owner', 'attempts')
if t[1] ~= 'RUNNING' or t[2] ~= ARGV[1] then
  return 'lost'
end
local attempt = t[3] or '1'
local fraction, message = nil, nil
for _, report in ipairs(cjson.decode(ARGV[7])) do
  if report[1] == 'progress' then
    fraction, message = report[2], report[3]
    redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], '*', 'kind', 'progress',
      'fraction', fraction, 'message', message, 'attempt', attempt)
  else
    redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], '*', 'kind', 'output',
      'chunk', report[3], 'attempt', attempt)
  end
end
if fraction then
  redis.call('HSET', KEYS[1], 'progress', fraction, 'progress_message', message)
end
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call(ARGV[5], ARGV[4], ARGV[6])
return 'written'
