-- Decide, for a batch of deliveries, which tasks this consumer runs, and mark those RUNNING.
-- A task already final is only acknowledged, so a redelivery never runs it again or moves it
-- back to RUNNING. A task delivered MAX_DELIVERIES times without finishing is failed and its
-- entry copied to the dead-letter stream.
-- KEYS: stream, dead_letter, task_1 .. task_n
-- ARGV: group, consumer, now, max_deliveries, entry_1, task_id_1, .. entry_n, task_id_n
-- Returns per delivery: {verdict, request, signature, scope, trace, created_at, attempts}
local stream, dead = KEYS[1], KEYS[2]
local group, consumer, now = ARGV[1], ARGV[2], ARGV[3]
local max_deliveries = tonumber(ARGV[4])
local out = {}

for i = 3, #KEYS do
  local key = KEYS[i]
  local entry = ARGV[2 * i - 1]
  local task_id = ARGV[2 * i]
  local t = redis.call('HMGET', key, 'status', 'deliveries', 'cancel', 'request', 'signature',
    'scope', 'trace', 'created_at', 'attempts')
  local status = t[1]
  if not status or status == 'DONE' or status == 'FAILED' or status == 'CANCELLED' then
    redis.call('XACK', stream, group, entry)
    out[#out + 1] = {'skip'}
  elseif t[3] == '1' then
    redis.call('HSET', key, 'status', 'CANCELLED', 'finished_at', now,
      'error', 'cancelled before it started')
    redis.call('XACK', stream, group, entry)
    out[#out + 1] = {'cancelled'}
  elseif tonumber(t[2] or '0') >= max_deliveries then
    local message = 'dead-lettered: delivered ' .. (t[2] or '0') ..
      ' times without finishing (MAX_DELIVERIES=' .. max_deliveries .. ')'
    redis.call('HSET', key, 'status', 'FAILED', 'finished_at', now, 'error', message)
    redis.call('XADD', dead, '*', 'task_id', task_id, 'entry_id', entry,
      'scope', t[6] or '', 'deliveries', t[2] or '0', 'failed_at', now)
    redis.call('XACK', stream, group, entry)
    out[#out + 1] = {'dead'}
  else
    local attempts = redis.call('HINCRBY', key, 'attempts', 1)
    redis.call('HINCRBY', key, 'deliveries', 1)
    redis.call('HSET', key, 'status', 'RUNNING', 'started_at', now, 'owner', consumer)
    out[#out + 1] = {'run', t[4], t[5] or '', t[6] or '', t[7] or '', t[8] or '0', attempts}
  end
end
return out
