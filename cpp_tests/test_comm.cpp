// Host side of the comm family, without a GPU or NCCL: the displacements and count checks, the exchange schedule
// (driven through a fake NCCL function table that records every call), the communicator table, and the run-time
// loader's reasons when a library is missing or is not NCCL.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "comm/comm.h"
#include "common/check.h"

namespace {

using namespace k2::comm;

// ---- A fake NCCL that records calls ----------------------------------------------------------------------

struct Call {
    std::string what;  // "start", "end", "send", "recv", "init", "destroy", "abort"
    const void* buf = nullptr;
    std::size_t count = 0;
    int peer = -1;
};

struct Fake {
    std::vector<Call> calls;
    ncclResult_t send_result = ncclSuccess, init_result = ncclSuccess;
    int comms = 0;
};
Fake fake;

ncclResult_t fake_start() {
    fake.calls.push_back({"start"});
    return ncclSuccess;
}
ncclResult_t fake_end() {
    fake.calls.push_back({"end"});
    return ncclSuccess;
}
ncclResult_t fake_send(const void* buf, std::size_t count, ncclDataType_t type, int peer, ncclComm_t, cudaStream_t) {
    EXPECT_EQ(type, ncclUint8);
    fake.calls.push_back({"send", buf, count, peer});
    return fake.send_result;
}
ncclResult_t fake_recv(void* buf, std::size_t count, ncclDataType_t type, int peer, ncclComm_t, cudaStream_t) {
    EXPECT_EQ(type, ncclUint8);
    fake.calls.push_back({"recv", buf, count, peer});
    return ncclSuccess;
}
const char* fake_error_string(ncclResult_t r) {
    return r == ncclRemoteError ? "remote process exited or there was a network error" : "other";
}
ncclResult_t fake_init(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) {
    fake.calls.push_back({"init", nullptr, std::size_t(nranks), rank});
    EXPECT_EQ(id.internal[0], 'k');
    if (fake.init_result != ncclSuccess) return fake.init_result;
    *comm = reinterpret_cast<ncclComm_t>(std::uintptr_t(0x1000 + ++fake.comms));
    return ncclSuccess;
}
ncclResult_t fake_destroy(ncclComm_t) {
    fake.calls.push_back({"destroy"});
    return ncclSuccess;
}
ncclResult_t fake_abort(ncclComm_t) {
    fake.calls.push_back({"abort"});
    return ncclSuccess;
}

NcclApi fake_api() {
    fake = Fake{};
    NcclApi api;
    api.group_start = fake_start;
    api.group_end = fake_end;
    api.send = fake_send;
    api.recv = fake_recv;
    api.get_error_string = fake_error_string;
    api.comm_init_rank = fake_init;
    api.comm_destroy = fake_destroy;
    api.comm_abort = fake_abort;
    return api;
}

// ---- Displacements and counts ------------------------------------------------------------------------------

TEST(CommHost, DisplacementsAreExclusivePrefixSums) {
    EXPECT_EQ(displacements({3, 0, 5, 1}), (std::vector<int64_t>{0, 3, 3, 8, 9}));
    EXPECT_EQ(displacements({0, 0}), (std::vector<int64_t>{0, 0, 0}));
    EXPECT_EQ(displacements({}), (std::vector<int64_t>{0}));
}

TEST(CommHost, CountsAreChecked) {
    EXPECT_NO_THROW(check_counts({2, 0, 1}, 3, 3, "nccl_dispatch", "send_counts"));
    EXPECT_NO_THROW(check_counts({0, 0}, 2, 0, "nccl_dispatch", "send_counts"));
    try {
        check_counts({2, 1}, 3, 3, "nccl_dispatch", "send_counts");
        FAIL() << "expected an ArgumentError";
    } catch (const k2::ArgumentError& e) {
        EXPECT_NE(std::string(e.what()).find("k2.ops.nccl_dispatch: argument 'send_counts'"), std::string::npos);
        EXPECT_NE(std::string(e.what()).find("one row count per rank (3), got 2"), std::string::npos);
    }
    EXPECT_THROW(check_counts({2, -1, 2}, 3, 3, "op", "recv_counts"), k2::ArgumentError);
    try {
        check_counts({2, 2}, 2, 5, "op", "recv_counts");
        FAIL() << "expected an ArgumentError";
    } catch (const k2::ArgumentError& e) {
        EXPECT_NE(std::string(e.what()).find("sum to 4 rows but the buffer has 5"), std::string::npos);
    }
}

// ---- Exchange schedule -------------------------------------------------------------------------------------

TEST(CommHost, ExchangeSendsEachPeerItsSliceInOneGroup) {
    const NcclApi api = fake_api();
    char send[100], recv[200], send_ids[100], recv_ids[200];
    // 3 ranks; rows of 8 bytes (x) and 4 bytes (ids). Rank sends 2, 0, 3 rows and receives 1, 4, 0.
    ExchangePlan plan{{2, 0, 3}, {1, 4, 0}, {{send, recv, 8}, {send_ids, recv_ids, 4}, {send, recv, 0}}};
    exchange(api, nullptr, plan, nullptr);
    const std::vector<Call>& c = fake.calls;
    ASSERT_EQ(c.size(), 2u + 2 * 4);  // start, (send 0, recv 0, recv 1, send 2) per lane with bytes, end
    EXPECT_EQ(c.front().what, "start");
    EXPECT_EQ(c.back().what, "end");
    const std::vector<Call> x(c.begin() + 1, c.begin() + 5), ids(c.begin() + 5, c.begin() + 9);
    EXPECT_EQ(x[0].what, "send");
    EXPECT_EQ(x[0].peer, 0);
    EXPECT_EQ(x[0].buf, send);
    EXPECT_EQ(x[0].count, 16u);
    EXPECT_EQ(x[1].what, "recv");
    EXPECT_EQ(x[1].peer, 0);
    EXPECT_EQ(x[1].buf, recv);
    EXPECT_EQ(x[1].count, 8u);
    EXPECT_EQ(x[2].what, "recv");  // nothing to send to rank 1
    EXPECT_EQ(x[2].peer, 1);
    EXPECT_EQ(x[2].buf, recv + 8);
    EXPECT_EQ(x[2].count, 32u);
    EXPECT_EQ(x[3].what, "send");  // nothing to receive from rank 2
    EXPECT_EQ(x[3].peer, 2);
    EXPECT_EQ(x[3].buf, send + 16);
    EXPECT_EQ(x[3].count, 24u);
    EXPECT_EQ(ids[3].buf, send_ids + 8);
    EXPECT_EQ(ids[3].count, 12u);
    EXPECT_EQ(ids[2].buf, recv_ids + 4);
}

TEST(CommHost, ARankWithNothingToMoveStillJoinsTheGroup) {
    const NcclApi api = fake_api();
    char buf[8];
    exchange(api, nullptr, ExchangePlan{{0, 0}, {0, 0}, {{buf, buf, 8}}}, nullptr);
    ASSERT_EQ(fake.calls.size(), 2u);
    EXPECT_EQ(fake.calls[0].what, "start");
    EXPECT_EQ(fake.calls[1].what, "end");
}

TEST(CommHost, AFailedSendClosesTheGroupAndNamesTheError) {
    NcclApi api = fake_api();
    fake.send_result = ncclRemoteError;
    char buf[64];
    try {
        exchange(api, nullptr, ExchangePlan{{1, 1}, {1, 1}, {{buf, buf + 32, 8}}}, nullptr);
        FAIL() << "expected the NCCL error";
    } catch (const std::runtime_error& e) {
        const std::string what = e.what();
        EXPECT_NE(what.find("ncclSend: NCCL error 6 (remote process exited"), std::string::npos) << what;
    }
    EXPECT_EQ(fake.calls.back().what, "end");
    EXPECT_EQ(fake.calls.size(), 3u);  // start, the failed send, end: nothing more after the failure
}

// ---- Communicator table ------------------------------------------------------------------------------------

ncclUniqueId test_id() {
    ncclUniqueId id;
    std::memset(id.internal, 0, sizeof(id.internal));
    id.internal[0] = 'k';
    return id;
}

TEST(CommHost, CommunicatorHandlesAreCheckedAndDestroyedOnce) {
    const NcclApi api = fake_api();
    const int64_t a = create_communicator(api, test_id(), 4, 1, 0);
    const int64_t b = create_communicator(api, test_id(), 2, 0, 1);
    EXPECT_GT(a, 0);
    EXPECT_NE(a, b);
    const Communicator ca = find_communicator(a, "nccl_dispatch");
    EXPECT_EQ(ca.rank, 1);
    EXPECT_EQ(ca.world_size, 4);
    EXPECT_EQ(ca.device, 0);
    EXPECT_NE(ca.comm, nullptr);
    EXPECT_TRUE(destroy_communicator(api, a, false));
    EXPECT_FALSE(destroy_communicator(api, a, false));
    EXPECT_EQ(fake.calls.back().what, "destroy");
    try {
        find_communicator(a, "nccl_dispatch");
        FAIL() << "expected an ArgumentError";
    } catch (const k2::ArgumentError& e) {
        EXPECT_NE(std::string(e.what()).find("argument 'comm': no live NCCL communicator"), std::string::npos);
    }
    EXPECT_EQ(destroy_all_communicators(api, true), 1);  // b, aborted
    EXPECT_EQ(fake.calls.back().what, "abort");
    EXPECT_TRUE(live_communicators().empty());
}

TEST(CommHost, CommunicatorArgumentsAndInitErrors) {
    NcclApi api = fake_api();
    EXPECT_THROW(create_communicator(api, test_id(), 2, 2, 0), k2::ArgumentError);
    EXPECT_THROW(create_communicator(api, test_id(), 0, 0, 0), k2::ArgumentError);
    EXPECT_THROW(create_communicator(api, test_id(), 2, 0, -1), k2::ArgumentError);
    EXPECT_TRUE(fake.calls.empty());  // rejected before NCCL is called
    fake.init_result = ncclInvalidUsage;
    try {
        create_communicator(api, test_id(), 2, 0, 0);
        FAIL() << "expected the NCCL error";
    } catch (const std::runtime_error& e) {
        EXPECT_NE(std::string(e.what()).find("ncclCommInitRank: NCCL error 5"), std::string::npos) << e.what();
    }
    EXPECT_TRUE(live_communicators().empty());
}

// ---- Loader ------------------------------------------------------------------------------------------------

TEST(CommHost, VersionStrings) {
    EXPECT_EQ(nccl_version_string(22703), "2.27.3");
    EXPECT_EQ(nccl_version_string(21805), "2.18.5");
    EXPECT_EQ(nccl_version_string(2708), "2.7.8");
    EXPECT_EQ(nccl_version_string(0), "unknown");
}

TEST(CommHost, AMissingLibraryGivesAReasonPerCandidate) {
    std::string reason;
    EXPECT_EQ(open_nccl({"/nonexistent/libnccl.so.2", "libk2-no-such-nccl.so.9"}, reason), nullptr);
    EXPECT_NE(reason.find("/nonexistent/libnccl.so.2: "), std::string::npos) << reason;
    EXPECT_NE(reason.find("; libk2-no-such-nccl.so.9: "), std::string::npos) << reason;
    EXPECT_EQ(open_nccl({}, reason), nullptr);
    EXPECT_EQ(reason, "no candidate library to load");
}

TEST(CommHost, ALibraryThatIsNotNcclIsRejectedByName) {
    std::string reason;
    // The C math library is always there and exports none of NCCL's symbols.
    EXPECT_EQ(open_nccl({"libm.so.6"}, reason), nullptr);
    EXPECT_NE(reason.find("libm.so.6: has no symbol ncclGetUniqueId"), std::string::npos) << reason;
}

}  // namespace
