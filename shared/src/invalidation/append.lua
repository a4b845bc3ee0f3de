-- APPEND: takes the partition's next seq, appends the message to its log and
-- publishes it, in one atomic step; records the event ids it carries.
-- KEYS[1] epoch, [2] epoch birth, [3] seq, [4] last, [5] log, [6] channel,
-- then the event-id markers
-- ARGV[1] epoch candidate, [2] message version, [3] partition, [4] nonce,
-- [5] message tail, [6] log max length, [7] publish command ('PUBLISH' or
-- 'SPUBLISH'), [8] event-id ttl secs
local epoch = ensure_epoch(KEYS[1], KEYS[2], ARGV[1])
local seq = redis.call('INCR', KEYS[3])
local prev = ''
local last = redis.call('GET', KEYS[4])
if last then
  local s, n = string.match(last, '^(%d+) (%w+)$')
  if s and tonumber(s) == seq - 1 then prev = n end
end
local nonce = ARGV[4]
local msg = '{"v":' .. ARGV[2] .. ',"p":' .. ARGV[3] .. ',"epoch":"' .. epoch .. '","seq":' .. seq ..
  ',"nonce":"' .. nonce .. '","prev":"' .. prev .. '",' .. ARGV[5]
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[6], seq .. '-0', 'm', msg, 'n', nonce)
redis.call('SET', KEYS[4], seq .. ' ' .. nonce)
redis.call(ARGV[7], KEYS[6], msg)
for i = 7, #KEYS do
  redis.call('SET', KEYS[i], seq, 'EX', ARGV[8])
end
return {epoch, seq}
