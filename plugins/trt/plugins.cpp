// TensorRT IPluginV3 plugins over the edgetok kernels: TokenMerge, TokenDrop, ThresholdMerge.
//
// Registered as namespace "edgetok", version "1", names equal to the ONNX op types, so the
// ONNX parser finds them from a node's op_type + plugin_version + plugin_namespace. Fields
// match the ONNX attributes: r, keep, protect_first, fuse_dropped as kINT32, threshold as
// kFLOAT32. The library exports setLoggerFinder + getCreators, the entry points
// IPluginRegistry::loadLibrary and `trtexec --dynamicPlugins=` look for.
//
// Written against the public TensorRT 10 plugin API (NvInferRuntime.h); it is compiled only
// where TensorRT is installed (CMake option EDGETOK_BUILD_TRT_PLUGIN). The kernels and all
// semantics live in libedgetok_kernels.so (the C API in edgetok/kernels.h).
//
// Build-time validation: configurePlugin (the profile's min..max shapes) and onShapeChange (the
// actual shapes) reject input counts and ranks, dtypes the kernels lack, inputs whose batch or
// token count differ from x's, attribute values the token count cannot take (r, keep,
// protect_first) and shapes the kernels do not support, each with a message naming the op and
// the fix. createPlugin rejects attribute values no shape could take.
//
// Serialized fields: the attributes plus "edgetok_format" (INT32, kFormatVersion), which the ONNX
// parser never passes (it is not an ONNX attribute and the creators do not list it).
// Deserialisation (TensorRTPhase::kRUNTIME) requires it and checks its value, so an engine
// serialized by a library with another field layout fails with "rebuild the engine" instead of
// running with misread fields; creation from ONNX attributes works without it.
//
// ThresholdMerge has a data-dependent token count M: it declares a 0-D INT32 size tensor as
// its fourth output (IExprBuilder::declareSizeTensor, upper bound N; the TensorRT 10 headers
// require size tensor outputs to be DataType::kINT32) and writes x_out [B,M,C],
// size_out [B,M,1], count [B] (INT64) with the row stride M computed on the device. The
// kernel keeps M as an int64 in the first 256 bytes of the workspace; enqueue copies its
// low 32 bits into the size tensor. TensorRT 8.5 (JetPack 5) has no IPluginV3; no
// IPluginV2DynamicExt variant is built.
#include <NvInferRuntime.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "edgetok/kernels.h"
#include "edgetok/rowops.h"

using namespace nvinfer1;

namespace {

constexpr char kNamespace[] = "edgetok";
constexpr char kVersion[] = "1";
// Layout of the serialized fields; raise it whenever a field is added, removed or changes meaning.
constexpr char kFormatField[] = "edgetok_format";
constexpr int32_t kFormatVersion = 1;

// ThresholdMerge: the int64 batch-max row count M sits at the start of the workspace (one
// 256-byte slot, keeping the kernels' scratch 256-byte aligned behind it).
constexpr size_t kCountSlot = 256;
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "ThresholdMerge copies the low 32 bits of an int64 into its INT32 size tensor");

ILoggerFinder* gLoggerFinder = nullptr;

void logError(std::string const& msg) {
    ILogger* logger = gLoggerFinder ? gLoggerFinder->findLogger() : nullptr;
    if (logger)
        logger->log(ILogger::Severity::kERROR, msg.c_str());
    else
        std::fprintf(stderr, "edgetok plugin: %s\n", msg.c_str());
}

int dtypeCode(DataType t) {
    switch (t) {
        case DataType::kFLOAT: return EDGETOK_F32;
        case DataType::kHALF: return EDGETOK_F16;
        case DataType::kBF16: return EDGETOK_BF16;
        default: return -1;
    }
}

char const* typeName(DataType t) {
    switch (t) {
        case DataType::kFLOAT: return "FLOAT";
        case DataType::kHALF: return "HALF";
        case DataType::kBF16: return "BF16";
        case DataType::kINT8: return "INT8";
        case DataType::kINT32: return "INT32";
        case DataType::kINT64: return "INT64";
        case DataType::kBOOL: return "BOOL";
        default: return "a non-float type";
    }
}

// The shapes an input may take: per dimension [min, max] (configurePlugin: the optimisation
// profile's bounds; onShapeChange: the actual shape, min == max).
struct InputRange {
    Dims min, max;
    DataType type;
};
constexpr int32_t kMaxInputs = 3;

std::string span(InputRange const& in, int d) {
    std::string lo = std::to_string(in.min.d[d]);
    return in.min.d[d] == in.max.d[d] ? lo : lo + ".." + std::to_string(in.max.d[d]);
}
bool sameDim(InputRange const& a, int da, InputRange const& b, int db) {
    return a.min.d[da] == b.min.d[db] && a.max.d[da] == b.max.d[db];
}

// Checks shared by the ops: the input count and ranks, x's dtype and the other float inputs'
// (same as x), and that every input has x's batch and token count. "" when all hold.
std::string checkCommon(InputRange const* in, int32_t nbInputs, int32_t nbOutputs, int32_t wantInputs,
                        int32_t wantOutputs, int32_t const* ranks, char const* const* names, int32_t nbFloat) {
    if (nbInputs != wantInputs || nbOutputs != wantOutputs)
        return "takes " + std::to_string(wantInputs) + " inputs and " + std::to_string(wantOutputs) +
               " outputs, the node has " + std::to_string(nbInputs) + " and " + std::to_string(nbOutputs) +
               "; re-export the model with edgetok";
    for (int32_t i = 0; i < nbInputs; ++i)
        if (in[i].max.nbDims != ranks[i])
            return std::string("input '") + names[i] + "' has rank " + std::to_string(in[i].max.nbDims) +
                   ", expected " + std::to_string(ranks[i]) + "; re-export the model with edgetok";
    if (dtypeCode(in[0].type) < 0)
        return std::string("x is ") + typeName(in[0].type) +
               "; the kernels take FLOAT, HALF or BF16: cast the model to one of them";
    for (int32_t i = 1; i < nbFloat; ++i)
        if (in[i].type != in[0].type)
            return std::string("input '") + names[i] + "' is " + typeName(in[i].type) + " but x is " +
                   typeName(in[0].type) + "; cast them to one type";
    for (int32_t i = 1; i < nbInputs; ++i) {
        if (!sameDim(in[i], 0, in[0], 0))
            return std::string("input '") + names[i] + "' has batch " + span(in[i], 0) + " but x has " +
                   span(in[0], 0) + "; give every input the same batch";
        if (!sameDim(in[i], 1, in[0], 1))
            return std::string("input '") + names[i] + "' has " + span(in[i], 1) + " tokens but x has " +
                   span(in[0], 1) + "; pass the " + names[i] + " of the same tokens as x";
    }
    return "";
}

// IPluginV3::clone: a copy, or nullptr if it cannot be made (the contract forbids throwing).
template <class Plugin>
IPluginV3* cloneOf(Plugin const& p) noexcept {
    try {
        return new Plugin(p);
    } catch (...) {
        logError(std::string(p.getPluginName()) + ": could not clone the plugin");
        return nullptr;
    }
}

// One scalar attribute of a plugin: its ONNX name and where its value lives.
struct Attr {
    char const* name;
    PluginFieldType type;  // kINT32 or kFLOAT32
    void* value;
};

// What every edgetok plugin shares: identity, capabilities, attribute (de)serialisation.
class PluginBase : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime {
public:
    explicit PluginBase(char const* name) : mName(name) {}

    IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
        if (type == PluginCapabilityType::kBUILD) return static_cast<IPluginV3OneBuild*>(this);
        if (type == PluginCapabilityType::kRUNTIME) return static_cast<IPluginV3OneRuntime*>(this);
        return static_cast<IPluginV3OneCore*>(this);
    }
    char const* getPluginName() const noexcept override { return mName; }
    char const* getPluginVersion() const noexcept override { return kVersion; }
    char const* getPluginNamespace() const noexcept override { return kNamespace; }

    int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*,
                            int32_t nbOutputs) noexcept override {
        InputRange r[kMaxInputs];
        for (int32_t i = 0; i < nbInputs && i < kMaxInputs; ++i) r[i] = {in[i].min, in[i].max, in[i].desc.type};
        return verdict(nbInputs, nbOutputs, r, "building the engine");
    }
    int32_t onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const*,
                          int32_t nbOutputs) noexcept override {
        InputRange r[kMaxInputs];
        for (int32_t i = 0; i < nbInputs && i < kMaxInputs; ++i) r[i] = {in[i].dims, in[i].dims, in[i].type};
        return verdict(nbInputs, nbOutputs, r, "at these input shapes");
    }
    IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }

    PluginFieldCollection const* getFieldsToSerialize() noexcept override {
        mFields.clear();
        for (Attr const& a : attrs()) mFields.emplace_back(a.name, a.value, a.type, 1);
        mFields.emplace_back(kFormatField, &kFormatVersion, PluginFieldType::kINT32, 1);
        mCollection.nbFields = static_cast<int32_t>(mFields.size());
        mCollection.fields = mFields.data();
        return &mCollection;
    }

    // Reads this plugin's attributes from a field collection; unknown fields (e.g. the parser's
    // plugin_namespace / plugin_version) are ignored. Deserialisation (kRUNTIME) also needs the
    // format field with this library's version. False (after logging why) if a field is wrong.
    bool readFields(PluginFieldCollection const* fc, TensorRTPhase phase) {
        int32_t format = -1;
        for (int32_t i = 0; fc && i < fc->nbFields; ++i) {
            PluginField const& f = fc->fields[i];
            if (f.name == nullptr) continue;
            if (std::strcmp(f.name, kFormatField) == 0) {
                if (f.type != PluginFieldType::kINT32 || f.length < 1 || f.data == nullptr) {
                    logError(std::string(mName) + ": field '" + kFormatField + "' must be one INT32");
                    return false;
                }
                std::memcpy(&format, f.data, 4);
                continue;
            }
            for (Attr const& a : attrs()) {
                if (std::strcmp(f.name, a.name) != 0) continue;
                if (f.type != a.type || f.length < 1 || f.data == nullptr) {
                    logError(std::string(mName) + ": attribute '" + a.name + "' must be one " +
                             (a.type == PluginFieldType::kINT32 ? "INT32" : "FLOAT32"));
                    return false;
                }
                std::memcpy(a.value, f.data, 4);
            }
        }
        if (phase == TensorRTPhase::kRUNTIME && format < 0) {
            logError(std::string(mName) + ": the serialized plugin has no '" + kFormatField +
                     "' field (an engine built with an older edgetok plugin library); rebuild the engine with "
                     "this library");
            return false;
        }
        if (format >= 0 && format != kFormatVersion) {
            logError(std::string(mName) + ": fields in format " + std::to_string(format) + ", this library reads " +
                     std::to_string(kFormatVersion) + "; rebuild the engine with this library");
            return false;
        }
        std::string why = checkAttrs();
        if (!why.empty()) logError(std::string(mName) + ": " + why);
        return why.empty();
    }

    virtual std::vector<Attr> attrs() = 0;

protected:
    // Float inputs share one dtype (x's); other positions are checked by the subclass.
    bool floatIo(int32_t pos, DynamicPluginTensorDesc const* io) const {
        DataType t = io[pos].desc.type;
        if (pos == 0) return dtypeCode(t) >= 0;
        return t == io[0].desc.type;
    }
    static bool linear(int32_t pos, DynamicPluginTensorDesc const* io) {
        return io[pos].desc.format == TensorFormat::kLINEAR;
    }
    int32_t report(int rc, char const* what) const {
        if (rc == EDGETOK_OK) return 0;
        logError(std::string(mName) + " " + what + ": " + edgetok_last_error());
        return -1;
    }

    // Attribute values no input shape could take ("" when fine).
    virtual std::string checkAttrs() const = 0;
    // Inputs against the attributes and the kernels ("" when fine). Only the first kMaxInputs
    // entries of in are filled; checkCommon rejects any other input count before reading them.
    virtual std::string checkInputs(InputRange const* in, int32_t nbInputs, int32_t nbOutputs) const = 0;

    int32_t verdict(int32_t nbInputs, int32_t nbOutputs, InputRange const* in, char const* when) const noexcept {
        try {
            std::string why = checkInputs(in, nbInputs, nbOutputs);
            if (why.empty()) return 0;
            logError(std::string(mName) + " (" + when + "): " + why);
        } catch (...) {
            logError(std::string(mName) + ": could not check the input shapes");
        }
        return -1;
    }

    char const* mName;
    std::vector<PluginField> mFields;
    PluginFieldCollection mCollection{};
};

// ---------------------------------------------------------------------------------------

// TokenMerge / ThresholdMerge inputs x [B,N,C], metric [B,N,Ck], size [B,N,1].
std::string checkMergeInputs(InputRange const* in, int32_t nbInputs, int32_t nbOutputs, int32_t wantOutputs,
                             int32_t protect) {
    static constexpr int32_t kRanks[] = {3, 3, 3};
    static constexpr char const* kNames[] = {"x", "metric", "size"};
    std::string why = checkCommon(in, nbInputs, nbOutputs, 3, wantOutputs, kRanks, kNames, 3);
    if (!why.empty()) return why;
    if (in[2].min.d[2] != 1 || in[2].max.d[2] != 1)
        return "size has last dimension " + span(in[2], 2) + "; it must be [B, N, 1] (tokens per patch)";
    if (protect > in[0].min.d[1])
        return "protect_first=" + std::to_string(protect) + " is more than the " + std::to_string(in[0].min.d[1]) +
               " tokens of the profile's smallest input; lower protect_first or build the profile for more tokens";
    if (!edgetok_token_merge_supported(in[0].max.d[1], in[1].max.d[2]))
        return "the kernels cannot run " + std::to_string(in[0].max.d[1]) + " tokens with a metric of width " +
               std::to_string(in[1].max.d[2]) + ": use a narrower metric (the keys averaged over heads), or " +
               "export without the plugin (the ONNX function body)";
    return "";
}

class TokenMergePlugin final : public PluginBase {
public:
    TokenMergePlugin() : PluginBase("TokenMerge") {}
    std::vector<Attr> attrs() override {
        return {{"r", PluginFieldType::kINT32, &mR}, {"protect_first", PluginFieldType::kINT32, &mProtect}};
    }
    IPluginV3* clone() noexcept override { return cloneOf(*this); }
    int32_t getNbOutputs() const noexcept override { return 2; }

    bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* io, int32_t, int32_t) noexcept override {
        return linear(pos, io) && floatIo(pos, io);  // x, metric, size, x_out, size_out
    }
    int32_t getOutputDataTypes(DataType* out, int32_t, DataType const* in, int32_t) const noexcept override {
        out[0] = out[1] = in[0];
        return 0;
    }
    std::string checkAttrs() const override {
        if (mR < 0) return "r=" + std::to_string(mR) + " is negative; export r >= 0";
        if (mProtect < 0) return "protect_first=" + std::to_string(mProtect) + " is negative; export a count >= 0";
        return "";
    }
    std::string checkInputs(InputRange const* in, int32_t nbInputs, int32_t nbOutputs) const override {
        std::string why = checkMergeInputs(in, nbInputs, nbOutputs, 2, mProtect);
        if (!why.empty()) return why;
        const int64_t n = in[0].min.d[1];  // r must fit the smallest token count of the profile
        const int limit = edgetok::max_merges((int)n, mProtect);
        if (mR > limit)
            return "r=" + std::to_string(mR) + " cannot be merged from " + std::to_string(n) + " tokens with " +
                   "protect_first=" + std::to_string(mProtect) + " (at most " + std::to_string(limit) +
                   " per step); lower r in the schedule or build the profile for more tokens";
        return "";
    }
    int32_t getOutputShapes(DimsExprs const* in, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* out, int32_t,
                            IExprBuilder& eb) noexcept override {
        if (nbInputs != 3 || in[0].nbDims != 3 || in[1].nbDims != 3 || in[2].nbDims != 3) return -1;
        auto const* rows = eb.operation(DimensionOperation::kSUB, *in[0].d[1], *eb.constant(mR));
        out[0].nbDims = 3, out[0].d[0] = in[0].d[0], out[0].d[1] = rows, out[0].d[2] = in[0].d[2];
        out[1].nbDims = 3, out[1].d[0] = in[0].d[0], out[1].d[1] = rows, out[1].d[2] = eb.constant(1);
        return 0;
    }
    size_t getWorkspaceSize(DynamicPluginTensorDesc const* in, int32_t, DynamicPluginTensorDesc const*,
                            int32_t) const noexcept override {
        return edgetok_token_merge_workspace_size(in[0].max.d[0], in[0].max.d[1]);
    }
    int32_t enqueue(PluginTensorDesc const* in, PluginTensorDesc const*, void const* const* inputs,
                    void* const* outputs, void* workspace, cudaStream_t stream) noexcept override {
        Dims const& d = in[0].dims;
        return report(edgetok_token_merge(dtypeCode(in[0].type), inputs[0], inputs[1], inputs[2], outputs[0],
                                          outputs[1], d.d[0], d.d[1], d.d[2], in[1].dims.d[2], mR, mProtect,
                                          workspace, edgetok_token_merge_workspace_size(d.d[0], d.d[1]), stream),
                      "enqueue");
    }

private:
    int32_t mR{0}, mProtect{1};
};

class TokenDropPlugin final : public PluginBase {
public:
    TokenDropPlugin() : PluginBase("TokenDrop") {}
    std::vector<Attr> attrs() override {
        return {{"keep", PluginFieldType::kINT32, &mKeep},
                {"protect_first", PluginFieldType::kINT32, &mProtect},
                {"fuse_dropped", PluginFieldType::kINT32, &mFuse}};
    }
    IPluginV3* clone() noexcept override { return cloneOf(*this); }
    int32_t getNbOutputs() const noexcept override { return 2; }

    bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* io, int32_t, int32_t) noexcept override {
        if (!linear(pos, io)) return false;
        if (pos == 3) return io[pos].desc.type == DataType::kINT64;  // idx
        return floatIo(pos, io);  // x, score, x_out
    }
    int32_t getOutputDataTypes(DataType* out, int32_t, DataType const* in, int32_t) const noexcept override {
        out[0] = in[0];
        out[1] = DataType::kINT64;
        return 0;
    }
    std::string checkAttrs() const override {
        if (mProtect < 0) return "protect_first=" + std::to_string(mProtect) + " is negative; export a count >= 0";
        if (mKeep < (mProtect > 1 ? mProtect : 1))
            return "keep=" + std::to_string(mKeep) + " is below max(1, protect_first=" + std::to_string(mProtect) +
                   "); keep at least the protected tokens";
        if (mFuse != 0 && mFuse != 1) return "fuse_dropped=" + std::to_string(mFuse) + " must be 0 or 1";
        return "";
    }
    std::string checkInputs(InputRange const* in, int32_t nbInputs, int32_t nbOutputs) const override {
        static constexpr int32_t kRanks[] = {3, 2};
        static constexpr char const* kNames[] = {"x", "score"};
        std::string why = checkCommon(in, nbInputs, nbOutputs, 2, 2, kRanks, kNames, 2);
        if (!why.empty()) return why;
        const int64_t n = in[0].min.d[1];
        if (mKeep > n)
            return "keep=" + std::to_string(mKeep) + " is more than the " + std::to_string(n) +
                   " tokens of the profile's smallest input; lower keep or build the profile for more tokens";
        if (!edgetok_token_drop_supported(in[0].max.d[1]))
            return std::string("the kernels cannot run ") + std::to_string(in[0].max.d[1]) + " tokens: " +
                   "build the profile for fewer, or export without the plugin (the ONNX function body)";
        return "";
    }
    int32_t getOutputShapes(DimsExprs const* in, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* out, int32_t,
                            IExprBuilder& eb) noexcept override {
        if (nbInputs != 2 || in[0].nbDims != 3 || in[1].nbDims != 2) return -1;
        out[0].nbDims = 3, out[0].d[0] = in[0].d[0], out[0].d[1] = eb.constant(mKeep + mFuse);
        out[0].d[2] = in[0].d[2];
        out[1].nbDims = 2, out[1].d[0] = in[0].d[0], out[1].d[1] = eb.constant(mKeep);
        return 0;
    }
    size_t getWorkspaceSize(DynamicPluginTensorDesc const* in, int32_t, DynamicPluginTensorDesc const*,
                            int32_t) const noexcept override {
        return edgetok_token_drop_workspace_size(in[0].max.d[0], in[0].max.d[1]);
    }
    int32_t enqueue(PluginTensorDesc const* in, PluginTensorDesc const*, void const* const* inputs,
                    void* const* outputs, void* workspace, cudaStream_t stream) noexcept override {
        Dims const& d = in[0].dims;
        return report(edgetok_token_drop(dtypeCode(in[0].type), inputs[0], inputs[1], outputs[0],
                                         static_cast<int64_t*>(outputs[1]), d.d[0], d.d[1], d.d[2], mKeep, mProtect,
                                         mFuse, workspace, edgetok_token_drop_workspace_size(d.d[0], d.d[1]),
                                         stream),
                      "enqueue");
    }

private:
    int32_t mKeep{1}, mProtect{1}, mFuse{0};
};

class ThresholdMergePlugin final : public PluginBase {
public:
    ThresholdMergePlugin() : PluginBase("ThresholdMerge") {}
    std::vector<Attr> attrs() override {
        return {{"threshold", PluginFieldType::kFLOAT32, &mThreshold},
                {"protect_first", PluginFieldType::kINT32, &mProtect}};
    }
    IPluginV3* clone() noexcept override { return cloneOf(*this); }
    // x_out, size_out, count, and the 0-D size tensor M
    int32_t getNbOutputs() const noexcept override { return 4; }

    bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* io, int32_t, int32_t) noexcept override {
        if (!linear(pos, io)) return false;
        if (pos == 5) return io[pos].desc.type == DataType::kINT64;  // count
        if (pos == 6) return io[pos].desc.type == DataType::kINT32;  // size tensor (must be INT32)
        return floatIo(pos, io);  // x, metric, size, x_out, size_out
    }
    int32_t getOutputDataTypes(DataType* out, int32_t, DataType const* in, int32_t) const noexcept override {
        out[0] = out[1] = in[0];
        out[2] = DataType::kINT64;  // count
        out[3] = DataType::kINT32;  // size tensor M
        return 0;
    }
    std::string checkAttrs() const override {
        if (mThreshold != mThreshold) return "threshold is NaN; export a number (1.0 or more merges nothing)";
        if (mProtect < 0) return "protect_first=" + std::to_string(mProtect) + " is negative; export a count >= 0";
        return "";
    }
    std::string checkInputs(InputRange const* in, int32_t nbInputs, int32_t nbOutputs) const override {
        return checkMergeInputs(in, nbInputs, nbOutputs, 4, mProtect);
    }
    int32_t getOutputShapes(DimsExprs const* in, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* out, int32_t,
                            IExprBuilder& eb) noexcept override {
        if (nbInputs != 3 || in[0].nbDims != 3 || in[1].nbDims != 3 || in[2].nbDims != 3) return -1;
        IDimensionExpr const* n = in[0].d[1];
        // Optimisation hint: about three quarters of the tokens stay; upper bound: all of them.
        auto const* opt = eb.operation(DimensionOperation::kFLOOR_DIV,
                                       *eb.operation(DimensionOperation::kPROD, *n, *eb.constant(3)), *eb.constant(4));
        auto const* m = eb.declareSizeTensor(3, *opt, *n);
        if (m == nullptr) return -1;
        out[0].nbDims = 3, out[0].d[0] = in[0].d[0], out[0].d[1] = m, out[0].d[2] = in[0].d[2];
        out[1].nbDims = 3, out[1].d[0] = in[0].d[0], out[1].d[1] = m, out[1].d[2] = eb.constant(1);
        out[2].nbDims = 1, out[2].d[0] = in[0].d[0];
        out[3].nbDims = 0;  // size tensors are 0-D
        return 0;
    }
    size_t getWorkspaceSize(DynamicPluginTensorDesc const* in, int32_t, DynamicPluginTensorDesc const*,
                            int32_t) const noexcept override {
        return kCountSlot + edgetok_threshold_merge_workspace_size(in[0].max.d[0], in[0].max.d[1]);
    }
    int32_t enqueue(PluginTensorDesc const* in, PluginTensorDesc const*, void const* const* inputs,
                    void* const* outputs, void* workspace, cudaStream_t stream) noexcept override {
        Dims const& d = in[0].dims;
        auto* maxCount = static_cast<int64_t*>(workspace);
        int rc = report(edgetok_threshold_merge(dtypeCode(in[0].type), inputs[0], inputs[1], inputs[2], outputs[0],
                                                outputs[1], static_cast<int64_t*>(outputs[2]), maxCount, d.d[0],
                                                d.d[1], d.d[2], in[1].dims.d[2], mThreshold, mProtect,
                                                static_cast<char*>(workspace) + kCountSlot,
                                                edgetok_threshold_merge_workspace_size(d.d[0], d.d[1]), stream),
                        "enqueue");
        if (rc != 0) return rc;
        // M <= N < 2^31: the low 32 bits of the little-endian int64 are the INT32 size tensor.
        if (cudaMemcpyAsync(outputs[3], maxCount, sizeof(int32_t), cudaMemcpyDeviceToDevice, stream) != cudaSuccess) {
            logError(std::string(mName) + " enqueue: copying the row count into the size tensor failed");
            return -1;
        }
        return 0;
    }

private:
    float mThreshold{0.9f};
    int32_t mProtect{1};
};

// ---------------------------------------------------------------------------------------

template <class Plugin>
class Creator final : public IPluginCreatorV3One {
public:
    Creator() {
        Plugin proto;
        mName = proto.getPluginName();
        for (Attr const& a : proto.attrs()) {
            mNames.emplace_back(a.name);
        }
        for (size_t i = 0; i < mNames.size(); ++i)
            mFieldNames.emplace_back(mNames[i].c_str(), nullptr, proto.attrs()[i].type, 1);
        mCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
        mCollection.fields = mFieldNames.data();
    }
    char const* getPluginName() const noexcept override { return mName.c_str(); }
    char const* getPluginVersion() const noexcept override { return kVersion; }
    char const* getPluginNamespace() const noexcept override { return kNamespace; }
    PluginFieldCollection const* getFieldNames() noexcept override { return &mCollection; }

    IPluginV3* createPlugin(char const*, PluginFieldCollection const* fc, TensorRTPhase phase) noexcept override {
        try {
            auto* p = new Plugin();
            if (!p->readFields(fc, phase)) {
                delete p;
                return nullptr;
            }
            return p;
        } catch (...) {
            logError(mName + ": could not create the plugin");
            return nullptr;
        }
    }

private:
    std::string mName;
    std::vector<std::string> mNames;
    std::vector<PluginField> mFieldNames;
    PluginFieldCollection mCollection{};
};

}  // namespace

extern "C" __attribute__((visibility("default"))) void setLoggerFinder(ILoggerFinder* finder) {
    gLoggerFinder = finder;
}

extern "C" __attribute__((visibility("default"))) IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
    static Creator<TokenMergePlugin> merge;
    static Creator<TokenDropPlugin> drop;
    static Creator<ThresholdMergePlugin> threshold;
    static IPluginCreatorInterface* const creators[] = {&merge, &drop, &threshold};
    nbCreators = 3;
    return creators;
}
