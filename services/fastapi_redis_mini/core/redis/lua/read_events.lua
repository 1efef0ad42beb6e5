-- Read a task for its event stream: the task's fields, then its reports after a cursor.
-- A pure read. The task is read first: report.lua appends only to a RUNNING task, so when
-- the status read here is final, the reports returned (fewer than `count`) are all there are.
-- KEYS: task, task events stream
-- ARGV: after (a stream entry id, exclusive), count
-- Returns: the JSON object {} for a missing task, else {task = the Task fields it has, as
--   get_tasks.lua names them, events = [[entry_id, kind, fraction, text, attempt], ..]}
local stored = {'status', 'scope', 'result', 'error', 'cached', 'attempts', 'created_at',
  'started_at', 'finished_at', 'cancel', 'progress', 'progress_message'}
local names = {cancel = 'cancel_requested'}
local values = redis.call('HMGET', KEYS[1], unpack(stored))
if not values[1] then
  return '{}'
end
local task = {}
for j, field in ipairs(stored) do
  local value = values[j]
  if value and value ~= '' then
    task[names[field] or field] = value
  end
end
local events = {}
for i, entry in ipairs(redis.call('XRANGE', KEYS[2], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])) do
  local f = {}
  for k = 1, #entry[2], 2 do
    f[entry[2][k]] = entry[2][k + 1]
  end
  if f.kind == 'progress' then
    events[i] = {entry[1], 'progress', f.fraction, f.message or '', f.attempt or '1'}
  else
    events[i] = {entry[1], 'output', '', f.chunk or '', f.attempt or '1'}
  end
end
return cjson.encode({task = task, events = events})
