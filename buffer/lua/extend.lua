-- Push back the visibility deadline of claims still held by a token (a learner that
-- keeps its batches claimed until a checkpoint commits them).
-- ARGV: token, visibility_ms, id1, id2, ...  A negative visibility_ms expires the claims
-- now instead (they are requeued by the next sample). Returns how many claims were held.
local token, visibility_ms = ARGV[1], tonumber(ARGV[2])
if #ARGV < 3 then return 0 end
local ids = {unpack(ARGV, 3)}
local holders = redis.call('HMGET', K_CLAIM_TOKEN, unpack(ids))
local deadline = 0
if visibility_ms >= 0 then deadline = now_ms() + visibility_ms end
local extended = 0
for i, id in ipairs(ids) do
  if holders[i] == token then
    redis.call('ZADD', K_CLAIMED, 'XX', deadline, id)
    extended = extended + 1
  end
end
return extended
