-- Read a batch of tasks, as the fields of the Task model (core/models.py), by name.
-- A pure read: it touches only the task hashes in KEYS. (A read of a DONE task used to
-- refresh the cached result's TTL too, through a key it was not given: see README, CACHE_TTL.)
-- KEYS: task_1 .. task_n
-- ARGV: none
-- Returns: the JSON array, one object per task in KEYS order, of the Task fields the task
--   has (empty ones left out; a missing task is {}); `result` is the result's JSON as a
--   string, since cjson would round its numbers.
local stored = {'status', 'scope', 'result', 'error', 'cached', 'attempts', 'created_at',
  'started_at', 'finished_at', 'cancel', 'progress', 'progress_message', 'priority', 'run_at',
  'deadline_at'}
-- The one field stored under another name than the model's.
local names = {cancel = 'cancel_requested'}
local out = {}
for i, key in ipairs(KEYS) do
  local values = redis.call('HMGET', key, unpack(stored))
  local task = {}
  for j, field in ipairs(stored) do
    local value = values[j]
    if value and value ~= '' then
      task[names[field] or field] = value
    end
  end
  out[i] = task
end
return cjson.encode(out)
