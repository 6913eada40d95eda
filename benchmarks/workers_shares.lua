-- wrk script for workers.py: count the responses of each worker (X-Worker),
-- and the highest connection number each reported (X-Worker-Connections).
--
-- Environment (read at load: wrk decides whether to delay before init runs):
--   WORKERS_THINK_MS: milliseconds each connection waits before its next
--                     request (unset or 0: back to back); paces the load,
--                     as wrk has no rate option;
--   WORKERS_CLOSE=1:  a connection per request ("Connection: close"),
--                     else keep-alive.
local threads = {}
local think = tonumber(os.getenv("WORKERS_THINK_MS") or "0") or 0

if think > 0 then
   function delay()
      return think
   end
end

if os.getenv("WORKERS_CLOSE") == "1" then
   wrk.headers["Connection"] = "close"
end

function setup(thread)
   table.insert(threads, thread)
end

function init(args)
   counts = {}
   connections = {}
end

function response(status, headers, body)
   local worker = headers["X-Worker"]
   if worker then
      counts[worker] = (counts[worker] or 0) + 1
      local n = tonumber(headers["X-Worker-Connections"]) or 0
      if n > (connections[worker] or 0) then
         connections[worker] = n
      end
   end
end

function done(summary, latency, requests)
   for _, thread in ipairs(threads) do
      local c = thread:get("counts")
      local n = thread:get("connections")
      for worker, count in pairs(c) do
         io.write(string.format("WORKER %s %d %d\n", worker, count, n[worker] or 0))
      end
   end
end
