-- wrk script: POST signal bodies rendered from a template, every record with a fresh id.
--
-- Usage: wrk -t1 -cN -dS -s bench/post.lua URL -- TEMPLATE PREFIX CONTENT_TYPE TOKEN
--
-- TEMPLATE is a file written by bench/fixtures.py: signal JSON with the markers @OID@
-- (filled with PREFIX .. 8 hex digits of a per-thread counter) and @SID@ (the session
-- suffix: five consecutive records share a session), exactly as fixtures.Template does.
-- Each thread gets its own prefix, so ids never repeat across threads or runs.
-- done() prints one line `BENCH_JSON {...}` that bench/wrk.py parses.

local threads = {}
local thread_count = 0

function setup(thread)
   thread:set("tid", thread_count)
   thread_count = thread_count + 1
   table.insert(threads, thread)
end

local parts, slots, oid_prefix
local counter = 0

local function split_template(text)
   local pieces, kinds = {}, {}
   local pos = 1
   while true do
      local s, e, marker = string.find(text, "@(%u%u%u)@", pos)
      if not s then break end
      table.insert(pieces, string.sub(text, pos, s - 1))
      table.insert(kinds, marker)
      pos = e + 1
   end
   table.insert(pieces, string.sub(text, pos))
   return pieces, kinds
end

function init(args)
   local file = assert(io.open(args[1], "rb"))
   local text = file:read("*a")
   file:close()
   -- 16 hex digits: the run's 12-digit prefix and this thread's 4-digit number
   oid_prefix = string.sub(args[2], 1, 12) .. string.format("%04x", tid)
   wrk.method = "POST"
   wrk.headers["Content-Type"] = args[3]
   wrk.headers["Authorization"] = "Bearer " .. args[4]
   local pieces, kinds = split_template(text)
   slots = kinds
   -- parts[1] = first piece, then (value, piece) pairs; values are overwritten per body
   parts = { pieces[1] }
   for i = 1, #kinds do
      parts[2 * i] = ""
      parts[2 * i + 1] = pieces[i + 1]
   end
end

function request()
   local current = counter
   for i = 1, #slots do
      if slots[i] == "OID" then
         current = counter
         parts[2 * i] = oid_prefix .. string.format("%08x", counter)
         counter = counter + 1
      else
         parts[2 * i] = oid_prefix .. string.format("%08x", math.floor(current / 5))
      end
   end
   return wrk.format(nil, nil, nil, table.concat(parts))
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"duration_us": %d, "requests": %d, "bytes": %d, ' ..
      '"connect_errors": %d, "read_errors": %d, "write_errors": %d, ' ..
      '"status_errors": %d, "timeouts": %d, "latency_p50_us": %d, "latency_p99_us": %d, ' ..
      '"latency_max_us": %d}\n',
      summary.duration, summary.requests, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(99), latency.max))
end
