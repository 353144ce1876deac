-- SPDX-License-Identifier: ISC
-- wrk script for POST /v1/bot/chat: one JWT (signed once by bench.py),
-- the issue's request, history_ids cycling over a fixed set so that
-- context stays bounded and realistic.  Never builds a token per request.
local token = os.getenv("TROUPE_BENCH_TOKEN")
local bot = os.getenv("TROUPE_BENCH_BOT")
local nhist = tonumber(os.getenv("TROUPE_BENCH_HISTORIES") or "64")
local headers = {
  ["Authorization"] = "Bearer " .. token,
  ["Content-Type"] = "application/json",
}
local reqs = {}
for i = 0, nhist - 1 do
  local body = string.format(
    '{"bot_id":"%s","user_id":"u_123456","query":"今天北京天气怎么样?",' ..
    '"history_id":"bench-%d"}', bot, i)
  reqs[i] = wrk.format("POST", "/v1/bot/chat", headers, body)
end
local n = 0
request = function()
  n = n + 1
  return reqs[n % nhist]
end
