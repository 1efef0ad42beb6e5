-- POST /tasks with the one prompt the harness warmed up: every request is a cache hit.
local here = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
dofile(here .. "common.lua")

wrk.method = "POST"
wrk.path = "/tasks"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"prompt": "bench hit", "params": {"duration": 0}}'
