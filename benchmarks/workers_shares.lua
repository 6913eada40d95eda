-- wrk script for workers.py: count the responses of each worker (X-Worker),
-- and the highest connection number each reported (X-Worker-Connections).
local threads = {}

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
