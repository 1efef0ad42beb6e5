-- GET /tasks/{id} of one finished task (TASK_ID).
local here = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
dofile(here .. "common.lua")

wrk.path = "/tasks/" .. (os.getenv("TASK_ID") or "missing")
