-- ROTATE: moves a partition to a new epoch if it is still in the one a fork
-- was found in (compare and set: of several processes that find the same
-- fork, one rotates). Returns the epoch now in force.
-- KEYS[1] epoch, KEYS[2] epoch birth; ARGV[1] the forked epoch, ARGV[2] the new one
local epoch = redis.call('GET', KEYS[1])
if epoch and epoch ~= ARGV[1] then return epoch end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], now_ms())
return ARGV[2]
