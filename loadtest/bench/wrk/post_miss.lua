-- POST /tasks with a prompt never sent before: every request is a cache miss and queues a task.
local here = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
dofile(here .. "common.lua")

local threads = 0
local counter = 0
local prefix = ""
local headers = { ["Content-Type"] = "application/json" }

setup = function(thread)
   threads = threads + 1
   thread:set("thread_number", threads)
end

init = function(args)
   prefix = string.format("%s-%d", os.getenv("BENCH_RUN_ID") or "run", thread_number or 0)
end

request = function()
   counter = counter + 1
   local body = string.format(
      '{"prompt": "bench miss %s-%d", "params": {"duration": 0}}', prefix, counter)
   return wrk.format("POST", "/tasks", headers, body)
end
